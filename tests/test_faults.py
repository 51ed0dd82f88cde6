"""Faults: kills at any instant of a save, signals, a full disk, corrupt or foreign files,
resumes with changed settings, undecodable data, damaged or unwritable caches (issue 13).

The kill-at-every-step tests stand in for ``kill -9``: a wrapper around every call that changes
the file system (``os.replace``, ``os.fsync``, ``os.mkdir``, ``os.unlink``, ``shutil.rmtree``)
raises at the k-th call and at every call after it (a dead process does nothing more, not even
its ``finally`` clean-up), for every k. The random real-signal loop is
``benchmarks/kill_loop.py`` (run by the slow test at the end).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engram import EngramConfig, GPTConfig
from engram.cli import main
from engram.training import checkpoint as ckpt
from engram.training import data
from engram.training.loop import StopSignals, Trainer, build_model

from helpers import TINY, make_text  # noqa: E402
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small():
    """A tiny Engram GPT with an HF tokenizer (what a checkpoint holds)."""
    tok = data.train_bpe_tokenizer(make_text(200), 300, cache=False)
    e = EngramConfig(hidden_size=32, layer_ids=[1], n_embed_per_ngram=32, n_head_per_ngram=2,
                     engram_vocab_size=[53, 53], pad_id=tok.eos_token_id)
    return build_model(GPTConfig(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32, block_size=32, engram=e), tok, 0), tok


def train(*argv: str) -> int:
    return main(["train", *argv])


def weights(path) -> dict[str, torch.Tensor]:
    return dict(ckpt.load_checkpoint(path).model.state_dict())


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ---------------------------------------------------------------------- kill at any instant
class Killed(BaseException):
    """The process died here (not an Exception: nothing in the code under test may catch it)."""


FS_CALLS = [(os, "replace"), (os, "fsync"), (os, "mkdir"), (os, "unlink"), (shutil, "rmtree")]


def die_at(monkeypatch, k: int) -> dict[str, int]:
    """From the k-th file-system call on (1-based; 0 = never), every such call raises Killed."""
    count = {"n": 0}
    for mod, name in FS_CALLS:
        real = getattr(mod, name)

        def wrapped(*a, _real=real, **kw):
            count["n"] += 1
            if k and count["n"] >= k:
                raise Killed
            return _real(*a, **kw)

        monkeypatch.setattr(mod, name, wrapped)
    return count


def test_run_checkpoint_survives_a_kill_at_every_file_system_step(tmp_path, small, monkeypatch):
    model, tok = small
    template = tmp_path / "template"
    ckpt.save_run_checkpoint(template, model, tok, 1, {"step": 1})
    shutil.copytree(template, tmp_path / "count")
    with pytest.MonkeyPatch.context() as mp:
        count = die_at(mp, 0)
        ckpt.save_run_checkpoint(tmp_path / "count", model, tok, 2, {"step": 2})
    n_ops = count["n"]
    assert n_ops >= 8
    seen = set()
    for k in range(1, n_ops + 1):
        run = tmp_path / f"k{k}"
        shutil.copytree(template, run)
        with pytest.MonkeyPatch.context() as mp:
            die_at(mp, k)
            with pytest.raises(Killed):
                with torch.no_grad():
                    model.lm_head.weight.add_(1.0)  # the step-2 weights differ from step 1's
                    try:
                        ckpt.save_run_checkpoint(run, model, tok, 2, {"step": 2})
                    finally:
                        model.lm_head.weight.sub_(1.0)
        latest = ckpt.resolve_checkpoint_dir(run)  # a complete checkpoint, old or new, always
        ck = ckpt.load_checkpoint(run, load_training_state=True)
        assert ck.training_state["step"] in (1, 2) and latest.name == f"step-0000000{ck.training_state['step']}"
        seen.add(ck.training_state["step"])
        ckpt.clean_run_dir(run)
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert all(".tmp-" not in n for n in names), (k, names)
        assert all(ckpt.is_complete(run / "checkpoints" / n) for n in names if n.startswith("step-")), (k, names)
        assert ckpt.save_run_checkpoint(run, model, tok, 3, {"step": 3}).name == "step-00000003"
        assert ckpt.load_checkpoint(run, load_training_state=True).training_state["step"] == 3
    assert seen == {1, 2}  # early kills keep step 1, late ones already have step 2


def test_replacing_a_lone_checkpoint_survives_a_kill_at_every_step(tmp_path, small):
    """save_checkpoint(path) over an existing checkpoint: a kill between its two renames used to
    leave no checkpoint at path (the data sat in hidden directories and loading said 'not an
    engram checkpoint'); loading now finds the complete copy."""
    model, tok = small
    template = tmp_path / "template"
    ckpt.save_checkpoint(template / "ck", model, tok, {"v": 1})
    with pytest.MonkeyPatch.context() as mp:
        count = die_at(mp, 0)
        ckpt.save_checkpoint(template / "ck", model, tok, {"v": 2})
    for k in range(1, count["n"] + 1):
        d = tmp_path / f"k{k}"
        shutil.copytree(template, d)
        with pytest.MonkeyPatch.context() as mp:
            die_at(mp, k)
            with pytest.raises(Killed):
                ckpt.save_checkpoint(d / "ck", model, tok, {"v": 3})
        with pytest.warns() if not (d / "ck").exists() else _no_warning():
            state = ckpt.load_checkpoint(d / "ck", load_training_state=True).training_state
        assert state["v"] in (2, 3), k


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------- signals
def test_sigterm_stops_between_steps_saves_and_resumes_bit_identically(tmp_path, text_file, monkeypatch, capsys):
    args = ["--data", str(text_file), "--steps", "6", *TINY]
    assert train(*args, "--out", str(tmp_path / "full")) == 0
    original = Trainer.set_lr  # called inside each step, in the main thread (the next batch is made ahead)

    def term_in_step_3(self):  # `timeout` or a cluster scheduler, in the middle of a step
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(Trainer, "set_lr", term_in_step_3)
    assert train(*args, "--out", str(tmp_path / "cut")) == 143
    assert "stopped by SIGTERM at step 4; checkpoint saved" in capsys.readouterr().err
    assert ckpt.load_checkpoint(tmp_path / "cut", load_training_state=True).training_state["step"] == 4
    monkeypatch.setattr(Trainer, "set_lr", original)
    assert train("--resume", str(tmp_path / "cut"), "--no-progress") == 0
    assert_same_weights(tmp_path / "full", tmp_path / "cut")

    def report(name):  # the curve's steps and losses (its seconds are wall-clock)
        r = json.loads((tmp_path / name / "report.json").read_text())
        return {"curve": [(c["step"], c["val_loss"]) for c in r["curve"]]}

    assert report("cut")["curve"] == report("full")["curve"]
    # A signal in the last step: the run completes with its final evaluation (the kill loop
    # found it skipped once), exit 0, the same curve.
    def term_in_last_step(self):
        if self.step == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(Trainer, "set_lr", term_in_last_step)
    assert train(*args, "--out", str(tmp_path / "last")) == 0
    assert report("last")["curve"] == report("full")["curve"]
    assert_same_weights(tmp_path / "full", tmp_path / "last")


def test_a_second_ctrl_c_aborts_at_once():
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (CI may ignore SIGINT)
    try:
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGINT  # the first only asks to stop
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
        # A signal the process ignores (nohup, a background job) stays ignored.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with StopSignals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


# ---------------------------------------------------------------------- full disk
@pytest.mark.parametrize("where", ["torch.save", "safetensors"])
def test_a_full_disk_at_save_keeps_the_previous_checkpoint(tmp_path, small, monkeypatch, where):
    import errno

    model, tok = small
    run = tmp_path / "run"
    first = ckpt.save_run_checkpoint(run, model, tok, 1, {"step": 1})
    if where == "torch.save":  # what torch.save says when the disk fills
        def boom(*a, **kw):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 99136 vs 99024")
        monkeypatch.setattr(torch, "save", boom)
    else:
        import safetensors.torch

        def boom(*a, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(safetensors.torch, "save_model", boom)
    with pytest.raises(ckpt.CheckpointWriteError, match="could not save the checkpoint .* intact") as e:
        ckpt.save_run_checkpoint(run, model, tok, 2, {"step": 2})
    if where == "safetensors":
        assert "the disk is full" in str(e.value) and "MB free" in str(e.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", first.name]  # no leftovers
    assert ckpt.load_checkpoint(run, load_training_state=True).training_state["step"] == 1


@pytest.mark.slow  # a fresh Python process (~5 s): CI runs it after the default tests
def test_train_on_a_full_disk_exits_with_a_clear_message(tmp_path, text_file):
    """A real write failure (a file-size limit, as a full disk would refuse): exit 2, no traceback."""
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000)); "
              "from engram.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", script, "train", "--data", str(text_file), "--steps", "2",
                        "--out", str(tmp_path / "run"), *TINY], capture_output=True, text=True,
                       env={**os.environ, "ENGRAM_CACHE_DIR": str(tmp_path / "cache")}, cwd=REPO)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "could not save the checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert not any(".tmp-" in p.name for p in (tmp_path / "run").rglob("*"))


# ---------------------------------------------------------------------- corrupt and foreign files
@pytest.fixture(scope="module")
def run6(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("run6") / "run"
    assert train("--data", str(text_file), "--steps", "6", "--out", str(out), *TINY) == 0
    return out


def copy_run(run, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


def test_random_bytes_in_a_checkpoint_are_detected(tmp_path, run6, capsys):
    run = copy_run(run6, tmp_path)
    w = ckpt.resolve_checkpoint_dir(run) / "model.safetensors"
    raw = bytearray(w.read_bytes())
    rng = np.random.default_rng(0)
    at = int(rng.integers(len(raw) // 2, len(raw) - 1000))
    raw[at:at + 1000] = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    w.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="SHA-256 of model.safetensors differs"):
        ckpt.load_checkpoint(run)
    assert main(["generate", "--checkpoint", str(run), "--prompt", "the cat"]) == 2
    assert "SHA-256" in capsys.readouterr().err
    assert train("--resume", str(run), "--no-progress") == 2
    ckpt.load_checkpoint(run, verify=False)  # sizes only: the caller's choice for huge checkpoints


def test_resume_refuses_changed_flags_unless_allowed(tmp_path, run6, capsys):
    run = copy_run(run6, tmp_path)
    assert train("--resume", str(run), "--steps", "8", "--lr", "0.01", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "--lr 0.003 -> 0.01" in err and "--allow-changes" in err
    assert train("--resume", str(run), "--steps", "8", "--dim", "64", "--allow-changes", "--no-progress") == 2
    assert "cannot change the model" in capsys.readouterr().err
    assert ckpt.load_checkpoint(run, load_training_state=True).training_state["step"] == 6  # nothing written
    assert train("--resume", str(run), "--steps", "8", "--lr", "0.01", "--allow-changes", "--no-progress") == 0
    state = ckpt.load_checkpoint(run, load_training_state=True).training_state
    assert state["step"] == 8 and state["train_config"]["lr"] == 0.01
    # A flag typed with its default value is a change too (the run's lr is now 0.01).
    assert train("--resume", str(run), "--steps", "9", "--lr", "0.003", "--no-progress") == 2
    assert "--lr 0.01 -> 0.003" in capsys.readouterr().err
    # A finished run is not saved again.
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert train("--resume", str(run), "--no-progress") == 0
    assert "already complete (8 steps)" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_resume_refuses_changed_data_unless_allowed(tmp_path, run6, text_file, capsys):
    run = copy_run(run6, tmp_path)
    original = text_file.read_text()
    try:
        text_file.write_text(make_text(seed=1))
        assert train("--resume", str(run), "--steps", "8", "--no-progress") == 2
        assert "is not the data the run trained on (nothing was read from it)" in capsys.readouterr().err
        assert train("--resume", str(run), "--steps", "8", "--allow-changes", "--no-progress") == 0
    finally:
        text_file.write_text(original)
    # A moved corpus (same tokens, another path) is the same data; another file given is not.
    run = copy_run(run6, tmp_path, "copy2")
    moved = tmp_path / "moved.txt"
    shutil.copy(text_file, moved)
    other = tmp_path / "other.txt"
    other.write_text(make_text(seed=2))
    assert train("--resume", str(run), "--steps", "7", "--data", str(other), "--no-progress") == 2
    assert "training data changed" in capsys.readouterr().err
    assert train("--resume", str(run), "--steps", "7", "--data", str(moved), "--no-progress") == 0


def test_resume_refuses_a_foreign_training_state(tmp_path, run6, text_file, capsys):
    run = copy_run(run6, tmp_path)
    other = tmp_path / "other"
    assert train("--data", str(text_file), "--steps", "6", "--out", str(other), *TINY) == 0
    mine = ckpt.resolve_checkpoint_dir(run)
    shutil.copy(ckpt.resolve_checkpoint_dir(other) / "training_state.pt", mine / "training_state.pt")
    ckpt.write_manifest(mine)  # even with a consistent manifest
    assert train("--resume", str(run), "--steps", "8", "--no-progress") == 2
    assert "belongs to another run" in capsys.readouterr().err


def test_resume_with_its_tokenizer_deleted_changes_nothing(tmp_path, run6, text_file, capsys):
    run = copy_run(run6, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    shutil.rmtree(ckpt.resolve_checkpoint_dir(run) / "tokenizer")
    assert train("--resume", str(run), "--steps", "8", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "has no complete checkpoint (the newest: " in err and "tokenizer/tokenizer.json is missing" in err
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert set(after) == {p for p in before if "tokenizer" not in p.parts}
    assert all(after[p] == before[p] for p in after)


def test_a_checkpoint_without_run_information_loads_but_does_not_resume(tmp_path, small, capsys):
    model, tok = small
    run = tmp_path / "run"
    ckpt.save_run_checkpoint(run, model, tok, 3, {"step": 3})  # no extra: not from engram train
    cfg = json.loads((ckpt.resolve_checkpoint_dir(run) / "config.json").read_text())
    assert cfg["extra"] == {}
    assert ckpt.load_checkpoint(run).meta["extra"] == {}
    assert train("--resume", str(run), "--no-progress") == 2
    assert "not written by engram train" in capsys.readouterr().err


def test_leftovers_of_interrupted_saves_are_removed_by_the_next_run(tmp_path, run6, capsys):
    run = copy_run(run6, tmp_path)
    cks = run / "checkpoints"
    (cks / ".step-00000007.tmp-4242").mkdir()
    (cks / ".step-00000007.tmp-4242" / "model.safetensors").write_bytes(b"x" * 1000)
    shutil.copytree(ckpt.resolve_checkpoint_dir(run), cks / "step-00000009")
    (cks / "step-00000009" / "manifest.json").unlink()  # incomplete: never loaded
    (cks / "latest.tmp-4242").write_text("step-00000009")
    assert ckpt.resolve_checkpoint_dir(run).name == "step-00000006"
    assert train("--resume", str(run), "--steps", "7", "--no-progress") == 0
    err = capsys.readouterr().err
    assert "removed .step-00000007.tmp-4242" in err and "removed step-00000009" in err
    assert sorted(p.name for p in cks.iterdir()) == ["latest", "step-00000006", "step-00000007"]


def test_a_crafted_pointer_cannot_lead_outside_the_run(tmp_path, run6):
    run = copy_run(run6, tmp_path)
    (run / "checkpoints" / "latest").write_text("../../elsewhere")
    with pytest.warns(UserWarning, match="not a complete checkpoint"):
        assert ckpt.resolve_checkpoint_dir(run).name == "step-00000006"


def test_a_symlinked_checkpoint_is_never_followed_or_pruned_through(tmp_path, run6):
    run = copy_run(run6, tmp_path)
    victim = tmp_path / "victim"
    shutil.copytree(ckpt.resolve_checkpoint_dir(run), victim)
    (run / "checkpoints" / "step-00000005").symlink_to(victim)
    (run / "checkpoints" / "step-00000099").symlink_to(victim)  # would be "latest" if links counted
    assert ckpt.resolve_checkpoint_dir(run).name == "step-00000006"
    assert train("--resume", str(run), "--steps", "8", "--keep-checkpoints", "1", "--no-progress") == 0
    assert ckpt.is_complete(victim) and (victim / "manifest.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000008"]


def test_stale_leftovers_of_a_lone_checkpoint_are_removed_by_the_next_save(tmp_path, small):
    model, tok = small
    ck = tmp_path / "ck"
    ckpt.save_checkpoint(ck, model, tok, {"v": 1})
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    for kind in ("tmp", "old"):
        shutil.copytree(ck, tmp_path / f".ck.{kind}-{dead}")
    ckpt.save_checkpoint(ck, model, tok, {"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    # While the target is missing, the .old copy is the only checkpoint: kept (and loaded).
    os.rename(ck, tmp_path / f".ck.old-{dead}")
    assert ckpt.clean_siblings(ck) == []
    with pytest.warns(UserWarning, match="a save was interrupted"):
        assert ckpt.load_checkpoint(ck, load_training_state=True).training_state == {"v": 2}


def test_an_out_directory_that_cannot_be_created_is_a_clear_error(tmp_path, monkeypatch):
    from pathlib import Path as P

    def refuse(self, *a, **kw):
        raise PermissionError(1, "Operation not permitted", str(self))

    monkeypatch.setattr(P, "mkdir", refuse)
    with pytest.raises(ValueError, match="cannot be created: Operation not permitted"):
        with ckpt.RunLock(tmp_path / "new"):
            pass


# ---------------------------------------------------------------------- data and caches
def test_undecodable_or_binary_data_is_an_error_with_the_byte_offset(tmp_path, capsys):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("caf\u00e9 au lait. " * 200).encode("latin-1"))
    with pytest.raises(ValueError, match=r"not UTF-8 text: byte 3 \(b'\\xe9 au'\).*--encoding"):
        data.load_corpus([str(latin)])
    corpus = data.load_corpus([str(latin)], encoding="latin-1")
    assert "caf\u00e9" in corpus.train_text and "\ufffd" not in corpus.train_text
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"text\0\0\0more text\n" * 100)
    with pytest.raises(ValueError, match="looks binary"):
        data.load_corpus([str(binary)])
    assert train("--data", str(latin), "--out", str(tmp_path / "r"), *TINY) == 2
    assert "byte 3" in capsys.readouterr().err and not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="not a text encoding"):
        data.load_corpus([str(latin)], encoding="no-such-codec")


def test_a_damaged_or_replaced_token_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    text = make_text(100)
    tok = data.train_bpe_tokenizer(text, 300)
    want = data.encode(tok, text)
    (cached,) = (tmp_path / "cache" / "tokens").glob("*.npy")
    np.save(cached, np.roll(want, 1))  # other valid ids
    with pytest.warns(UserWarning, match="damaged or was changed"):
        assert np.array_equal(data.encode(tok, text), want)
    cached.write_bytes(cached.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="damaged"):
        assert np.array_equal(data.encode(tok, text), want)
    assert np.array_equal(data.encode(tok, text), want)  # and the rebuilt entry is trusted again


def test_an_unwritable_cache_costs_time_not_the_run(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(blocker / "cache"))  # cannot be created, even by root
    text = make_text(100)
    with pytest.warns(UserWarning, match="cannot write the engram cache"):
        tok = data.train_bpe_tokenizer(text, 300)
    with pytest.warns(UserWarning, match="cannot write the engram cache"):
        ids = data.encode(tok, text)
    assert len(ids) > 100
    from helpers import tiny_gpt

    from engram.ops import cpu  # the kernel cache: unusable, so the torch path hashes (same ids)

    monkeypatch.setattr(cpu, "_tried", False)
    monkeypatch.setattr(cpu, "_lib", None)
    assert cpu.library() is None

    m = tiny_gpt(False)
    x = torch.randint(0, 97, (2, 16))
    with cpu.enabled(False):
        want = m.hashing.hash(x)
    got = m.hashing.hash(x)
    assert all(torch.equal(want[k], got[k]) for k in want)


# ---------------------------------------------------------------------- the random kill loop
@pytest.mark.slow
def test_random_kills_resume_bit_identically(tmp_path):
    """kill -9, SIGINT and SIGTERM at 20 random instants each (benchmarks/kill_loop.py)."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kill_loop.py"), "--n", "20", "--strict",
                        "--workdir", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 60 and all(x["identical"] for x in results)
    for sig, status in (("INT", 130), ("TERM", 143), ("KILL", -9)):
        rcs = [x["rc"] for x in results if x["signal"] == sig]
        assert set(rcs) <= {status, 0}, (sig, rcs)  # 0: the run had finished within the signal's delay
        assert rcs.count(status) >= 15, (sig, rcs)  # the signals really interrupted (most) runs
