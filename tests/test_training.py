"""Training loop, checkpoints (save/load/resume/errors), generate and inspect."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from engram import EngramConfig, EngramGPT, GPTConfig
from engram.training import checkpoint as ckpt
from engram.training import data
from engram.cli import main
from engram.training.loop import Trainer, TrainConfig, build_model, clip_gradients, lr_factor, run_training

from helpers import TINY, make_text  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file):
    """A tiny Engram run: ``engram train`` for 12 steps."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--data", str(text_file), "--steps", "12", "--out", str(out), *TINY]) == 0
    return out


def tiny_model(tok, engram: bool = True, seed: int = 0, sparse: bool = False) -> EngramGPT:
    e = EngramConfig(hidden_size=32, layer_ids=[1], n_embed_per_ngram=32, n_head_per_ngram=2,
                     engram_vocab_size=[53, 53], pad_id=tok.eos_token_id, sparse_grad=sparse) if engram else None
    return build_model(GPTConfig(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32, block_size=32, engram=e), tok, seed)


def test_lr_schedule_warmup_then_decay():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, max_steps=100)
    assert [lr_factor(s, 0.0, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(10, 0.0, cfg) == pytest.approx(1.0)
    assert lr_factor(10, 0.5, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(10, 1.0, cfg) == pytest.approx(0.1)
    lin = TrainConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, decay="linear", max_steps=10)
    assert lr_factor(5, 0.25, lin) == pytest.approx(0.75)


@pytest.mark.parametrize("bad", [dict(max_steps=None), dict(lr=0), dict(decay="step"), dict(max_steps=0),
                                 dict(time_budget=-1.0)])
def test_train_config_validation(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_clip_gradients_covers_sparse_and_dense():
    dense = torch.nn.Parameter(torch.zeros(4))
    dense.grad = torch.full((4,), 3.0)  # norm 6
    table = torch.nn.Parameter(torch.zeros(5, 2))
    table.grad = torch.sparse_coo_tensor([[1, 3]], torch.full((2, 2), 4.0), (5, 2), check_invariants=True)  # norm 8
    norm = clip_gradients([dense, table], 1.0)
    assert norm == pytest.approx(10.0)
    assert torch.linalg.vector_norm(dense.grad).item() == pytest.approx(0.6, rel=1e-4)
    assert table.grad.is_sparse and torch.linalg.vector_norm(table.grad.to_dense()).item() == pytest.approx(0.8, rel=1e-4)
    assert clip_gradients([dense], 0.0) == 0.0  # off


def test_lr_reaches_every_optimizer_group():
    tok = data.train_bpe_tokenizer(make_text(), 300)
    model = tiny_model(tok)
    b = data.TokenBatcher(data.encode(tok, make_text()), 2, 16)
    t = Trainer(model, b, TrainConfig(lr=1e-3, warmup_steps=0, max_steps=4, min_lr_ratio=0.5, batch_size=2, seq_len=16))
    assert len(t.optimizers) >= 1 and sum(len(o.param_groups) for o in t.optimizers) >= 2
    t.step = 2
    t.set_lr()
    f = lr_factor(2, 0.5, t.config)
    for opt in t.optimizers:
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(g["base_lr"] * f)
    table_lrs = [g["base_lr"] for o in t.optimizers for g in o.param_groups
                 if any(p is model.table_parameters()[0] for p in g["params"])]
    assert table_lrs == [pytest.approx(5e-3)]


@pytest.mark.parametrize("engram", [False, True])
def test_golden_loss_falls(engram):
    text = make_text()
    tok = data.train_bpe_tokenizer(text, 300)
    ids = data.encode(tok, text)
    t = Trainer(tiny_model(tok, engram), data.TokenBatcher(ids, 8, 32), TrainConfig(lr=3e-3, warmup_steps=5, max_steps=40,
                batch_size=8, seq_len=32), data.eval_batches(ids, 8, 32, 2048))
    first = t.evaluate()
    run_training(t, progress_bar=False)
    assert t.step == 40 and len(t.curve) >= 2
    assert t.curve[-1].val_loss < first - 1.0, (first, t.curve[-1].val_loss)
    assert math.log(len(tok)) == pytest.approx(first, abs=0.5)  # starts near uniform


def test_train_report_and_checkpoint(trained):
    report = json.loads((trained / "report.json").read_text())
    for key in ("tokens_per_second", "step_seconds_median", "final_val_loss"):
        assert report[key] > 0
    assert report["steps"] == 12 and report["params_table"] > 0
    latest = ckpt.resolve_checkpoint_dir(trained)
    assert ckpt.is_checkpoint(latest) and latest == trained / "checkpoints" / "step-00000012"
    assert (trained / "checkpoints" / "latest").read_text().strip() == latest.name
    assert report["checkpoint"] == str(latest)


def test_checkpoint_round_trip_same_logits(trained):
    a = ckpt.load_checkpoint(trained)  # the --out dir resolves to its latest checkpoint
    b = ckpt.load_checkpoint(ckpt.resolve_checkpoint_dir(trained))
    x = torch.tensor([a.tokenizer.encode("the cat sees the moon.")])
    torch.testing.assert_close(a.model(x)[0], b.model(x)[0], rtol=0, atol=0)
    assert a.model.lm_head.weight is a.model.wte.weight  # tying survives loading
    assert a.meta["format_version"] == ckpt.FORMAT_VERSION


def test_resume_after_ctrl_c_matches_uninterrupted_run(tmp_path, text_file, monkeypatch, terminal_sigint):
    args = ["--data", str(text_file), "--steps", "6", *TINY]
    assert main(["train", *args, "--out", str(tmp_path / "full")]) == 0

    original = Trainer.set_lr

    def interrupt_in_step_3(self):  # a real Ctrl-C arriving in the middle of step 3
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(Trainer, "set_lr", interrupt_in_step_3)
    assert main(["train", *args, "--out", str(tmp_path / "cut")]) == 130  # Ctrl-C: finish the step, save
    mid = ckpt.load_checkpoint(tmp_path / "cut", load_training_state=True)
    assert mid.training_state["step"] == 4  # step 3 (the 4th) completed, never half-saved
    monkeypatch.setattr(Trainer, "set_lr", original)
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0

    full, cut = ckpt.load_checkpoint(tmp_path / "full"), ckpt.load_checkpoint(tmp_path / "cut")
    for (name, p), q in zip(full.model.state_dict().items(), cut.model.state_dict().values()):
        assert torch.equal(p, q), name
    r_full = json.loads((tmp_path / "full" / "report.json").read_text())
    r_cut = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert r_cut["steps"] == 6 and r_cut["final_val_loss"] == r_full["final_val_loss"]
    assert [c["val_loss"] for c in r_cut["curve"]] == [c["val_loss"] for c in r_full["curve"]]


def test_resuming_a_copied_run_leaves_the_original_alone(tmp_path, trained):
    """A checkpoint records the directory it was trained in; resuming a copy must write the copy
    (it used to write back to the original, and a crafted checkpoint could name any path)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    original = files(trained)
    assert main(["train", "--resume", str(copy), "--steps", "14", "--no-progress"]) == 0
    assert files(trained) == original
    resumed = ckpt.load_checkpoint(copy, load_training_state=True)
    assert resumed.training_state["step"] == 14


def test_train_refuses_to_overwrite_and_bad_input(tmp_path, trained, text_file, capsys):
    before = (ckpt.resolve_checkpoint_dir(trained) / "model.safetensors").read_bytes()
    assert main(["train", "--data", str(text_file), "--steps", "2", "--out", str(trained), *TINY]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "does not exist" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("tiny text\n" * 3)
    assert main(["train", "--data", str(short), "--out", str(tmp_path / "y"), *TINY]) == 2
    assert "too short" in capsys.readouterr().err
    assert (ckpt.resolve_checkpoint_dir(trained) / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_checkpoint_errors(tmp_path, trained):
    import shutil

    with pytest.raises(ValueError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(ckpt.resolve_checkpoint_dir(trained), bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        ckpt.load_checkpoint(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        ckpt.load_checkpoint(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    w = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(w[: len(w) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        ckpt.load_checkpoint(bad)
    # A different tokenizer in the checkpoint: its manifest catches it first; in a checkpoint
    # without a manifest (format 1) the compression fingerprint no longer matches.
    shutil.copy(ckpt.resolve_checkpoint_dir(trained) / "model.safetensors", bad / "model.safetensors")
    shutil.rmtree(bad / "tokenizer")
    data.train_bpe_tokenizer(make_text(seed=9) + "zebra quartz jump\n" * 50, 300).save_pretrained(str(bad / "tokenizer"))
    with pytest.raises(ValueError, match="tokenizer"):
        ckpt.load_checkpoint(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(ValueError, match="incomplete: no manifest.json"):
        ckpt.load_checkpoint(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "format_version": 1}))
    with pytest.warns(UserWarning, match="without verification"), pytest.raises(ValueError, match="fingerprint"):
        ckpt.load_checkpoint(bad)
    # Saving over something that is not a checkpoint is refused and leaves it alone.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    model = ckpt.load_checkpoint(trained).model
    with pytest.raises(ValueError, match="refusing to overwrite"):
        ckpt.save_checkpoint(other, model, None)
    assert (other / "notes.txt").read_text() == "keep me"


def test_generate_is_reproducible(trained, capsys):
    from engram.cli.generate import generate_text

    a = generate_text(str(trained), "the cat", max_new_tokens=8, temperature=0.0)
    b = generate_text(str(trained), "the cat", max_new_tokens=8, temperature=0.0)
    assert a == b and a.startswith("the cat") and len(a) > len("the cat")
    assert main(["generate", "--checkpoint", str(trained), "--prompt", "a dog", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("a dog")
    assert main(["generate", "--checkpoint", str(trained / "missing")]) == 2


def test_inspect_gates_usage_and_engram_off_loss(trained, tmp_path):
    from engram.cli.inspect import gate_values, inspect, loss_with_and_without_engram

    text = "the king finds an apple. my friend loves the river."
    png = tmp_path / "gates.png"
    r = inspect(str(trained), text, str(png))
    assert png.exists() and png.stat().st_size > 1000
    u = r["table_usage"][1]
    assert 0 < u["rows_touched"] <= u["table_rows"] and 0 <= u["collision_rate"] < 1
    model = ckpt.load_checkpoint(trained).model
    ids = torch.tensor([ckpt.load_checkpoint(trained).tokenizer.encode(text)])
    gates = gate_values(model, ids)
    assert gates[1].shape == (ids.shape[1],) and bool(((gates[1] > 0) & (gates[1] < 1)).all())
    # Engram switched off == the same dense weights in a model without Engram.
    on, off = loss_with_and_without_engram(model, ids)
    plain = EngramGPT(GPTConfig(**{**model.config.to_dict(), "engram": None}))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".engram." not in k})
    with torch.no_grad():
        _, ref = plain(ids[:, :-1], ids[:, 1:])
    assert off == pytest.approx(float(ref), rel=1e-6) and on != off
    assert main(["inspect", "--checkpoint", str(trained), "--text", text, "--out", str(tmp_path / "g2.png")]) == 0


# ---------------------------------------------------------------------- GPU-ready loop (on CPU)
@pytest.fixture(scope="module")
def tok_ids():
    text = make_text()
    tok = data.train_bpe_tokenizer(text, 300)
    return tok, data.encode(tok, text)


def _trained_weights(tok, ids, sparse=False, **cfg):
    t = Trainer(tiny_model(tok, sparse=sparse), data.TokenBatcher(ids, 8, 32, seed=1),
                TrainConfig(lr=3e-3, warmup_steps=1, max_steps=3, batch_size=8, seq_len=32, **cfg))
    for _ in range(3):
        t.train_step()
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}, t


@pytest.mark.parametrize("sparse", [True, False])
def test_grad_accum_equals_the_whole_batch(sparse, tok_ids):
    tok, ids = tok_ids
    import engram.training.loop as loop_mod

    whole, t1 = _trained_weights(tok, ids, sparse)
    assert t1.model.table_parameters()[0].grad is None and t1.model.blocks[1].engram.memory.sparse_grad == sparse
    for n in (2, 4):
        parts, t = _trained_weights(tok, ids, sparse, grad_accum=n)
        assert t.tokens == 3 * 8 * 32  # same tokens per step
        # Float rounding of the summed micro-batch gradients, through Adam's normalisation: a few
        # 1e-6 on weights whose every step moves them by up to lr = 3e-3.
        for k in whole:
            torch.testing.assert_close(parts[k], whole[k], rtol=1e-4, atol=1e-5, msg=k)
    with pytest.raises(ValueError, match="divide batch_size"):
        TrainConfig(batch_size=8, grad_accum=3)
    assert loop_mod.AUTOCAST["fp32"] is None


def test_bf16_autocast_trains_on_cpu_near_fp32(tok_ids):
    tok, ids = tok_ids
    w32, t32 = _trained_weights(tok, ids)
    w16, t16 = _trained_weights(tok, ids, dtype="bf16")
    assert all(v.dtype == w32[k].dtype for k, v in w16.items())  # weights stay fp32
    assert all(math.isfinite(x) for x in t16.losses)
    assert abs(t16.losses[0] - t32.losses[0]) < 0.05, (t16.losses, t32.losses)  # bf16 rounding, not another model
    assert any(not torch.equal(w16[k], w32[k]) for k in w32)  # autocast really ran in bf16


def test_devices_that_do_not_exist_are_clear_errors(tmp_path, text_file, capsys):
    from engram.training.loop import check_device

    assert check_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            check_device("cuda")
    with pytest.raises(ValueError, match="only cpu, cuda and mps"):
        check_device("meta")
    with pytest.raises(ValueError, match="not a device torch knows"):
        check_device("warp-drive")
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        check_device("cpu", "fp16")
    assert main(["train", "--data", str(text_file), "--device", "cuda:7", "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "cuda:7" in capsys.readouterr().err and not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sparse", [False, True])
def test_compiled_training_step_equals_eager(sparse, tok_ids):
    tok, ids = tok_ids
    # sparse: table gradients as the study's default makes them; the lookup runs outside the graph
    eager, te = _trained_weights(tok, ids, sparse)
    compiled, tc = _trained_weights(tok, ids, sparse, compile=True)
    assert tc.model.blocks[1].engram.memory.sparse_grad == sparse
    assert tc.losses == pytest.approx(te.losses, rel=1e-5)
    # Fused kernels round differently; Adam's normalisation turns that into weight differences of
    # ~2e-5 after 3 steps of lr 3e-3 (1% of one step's update), measured 1.6e-5 / 1.8e-5.
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=5e-5, msg=k)
