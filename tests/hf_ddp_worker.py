"""A tiny ``EngramForCausalLM`` trained by ``EngramTrainer`` (the transformers Trainer), run by
tests/test_distributed.py in one process or under ``torchrun`` (gloo, accelerate's DDP).

    python tests/hf_ddp_worker.py OUT_DIR PER_DEVICE_BATCH SPARSE

Writes ``OUT_DIR/rank<R>.pt``: the final tables and dense weights, the logged losses, the world size.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    out, per_device, sparse = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, TrainingArguments

    from engram import EngramConfig
    from engram.hf.modeling import EngramForCausalLM
    from engram.hf.trainer import EngramTrainer

    tok = AutoTokenizer.from_pretrained(str(HERE / "fixtures" / "reference" / "tokenizer-bpe4096"))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=4096, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                       bos_token_id=None, eos_token_id=0, pad_token_id=1))
    eng = EngramConfig(hidden_size=32, layer_ids=[0], n_embed_per_ngram=16, n_head_per_ngram=2,
                       engram_vocab_size=[1009, 1009], sparse_grad=sparse)
    model = EngramForCausalLM.from_base(base, eng, tok)
    model.train()
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(2, 200, (16, 12), generator=g)
    data = [{"input_ids": r, "labels": r.clone()} for r in rows]
    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=per_device, max_steps=3,
                             learning_rate=1e-3, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                             ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    trainer = EngramTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    torch.save({"world": int(os.environ.get("WORLD_SIZE", "1")),
                "tables": [p.detach().clone() for p in model.table_parameters()],
                "dense": {k: v.detach().clone() for k, v in model.state_dict().items() if "memory" not in k},
                "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]},
               out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
