"""Training: optimizers, the training loop, data, checkpoints and table sizing."""
