"""Models with Engram branches: the small GPT (:mod:`engram.models.gpt`). transformers models are in
:mod:`engram.hf`."""
