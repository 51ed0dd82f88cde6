"""Training beyond one process (engram.distributed, docs/distributed.md): row-sharded tables, DDP for the
dense weights, sharded checkpoints that reshard, and faults. Multi-process tests use gloo on the CPU,
two ranks: in-process workers (torch.multiprocessing) for the math, torchrun for the command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.distributed.env import DistEnv
from engram.distributed.sharded import RowShardedEmbedding, shard_rows
from engram.nn.memory import MultiHeadEmbedding
from engram.training.optim import clip_grad_norm_
from helpers import TINY, tiny_gpt

REPO = Path(__file__).resolve().parents[1]
CPU1 = DistEnv(0, 1, torch.device("cpu"))


# ---------------------------------------------------------------------- layout and one-rank math
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_rows_give_every_row_of_every_head_one_owner(world):
    sizes = [7, 11, 5, 1, 2]
    ranges = shard_rows(sizes, world)
    for j, s in enumerate(sizes):
        owners = np.full(s, -1)
        for r in range(world):
            lo, hi = ranges[r][j]
            assert hi - lo <= -(-s // world)  # about 1/N of the head: at most ceil(s/N) rows
            assert (owners[lo:hi] == -1).all()
            owners[lo:hi] = r
        assert (owners >= 0).all()
        # torch.chunk cuts the head the same way (DTensor Shard(0), what the checkpoints record)
        chunks = torch.arange(s).chunk(world)
        assert [len(c) for c in chunks] == [hi - lo for lo, hi in (ranges[r][j] for r in range(len(chunks)))]


@pytest.mark.parametrize("sparse", [True, False])
def test_sharded_storage_on_one_rank_equals_the_table(sparse):
    torch.manual_seed(0)
    ref = MultiHeadEmbedding([7, 11, 5], 4, sparse=sparse)
    sh = RowShardedEmbedding([7, 11, 5], 4, CPU1, sparse=sparse)
    sh.load_full(ref.embedding.weight.detach())
    ids = torch.stack([torch.randint(0, s, (3, 9)) for s in [7, 11, 5]], -1)  # (B, T, H)
    a, b = ref(ids), sh(ids)
    assert torch.equal(a, b)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    assert sh.shard.grad.is_sparse == sparse
    torch.testing.assert_close(sh.shard.grad.to_dense(), ref.embedding.weight.grad.to_dense())
    assert list(sh.state_dict()) == ["offsets"]  # the shard is saved per rank (DCP), not in the model's state
    with pytest.raises(ValueError, match="hash_ids of head 1"):
        sh(torch.tensor([[[0, 11, 0]]]))


def test_clip_with_shard_sum_counts_sharded_norms_once_per_rank():
    torch.manual_seed(0)
    dense, table = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(8, 3))
    dense.grad = torch.randn(5, 3)
    table.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4, 1]]), torch.randn(3, 3), (8, 3), check_invariants=True)
    expected = math.sqrt(float(dense.grad.pow(2).sum() + 2 * table.grad.to_dense().pow(2).sum()))
    # two "ranks" holding the same table rows: the sharded part counts twice, the dense part once
    total = clip_grad_norm_([dense, table], 1e9, sharded={id(table)}, shard_sum=lambda t: 2 * t)
    assert float(total) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------- two ranks, in process
def _worker(rank: int, world: int, store_dir: str, out_dir: str) -> None:
    import torch.distributed as dist

    from engram.distributed.sharded import RowShardedEmbedding
    from engram.distributed.trainer import DistributedTrainer
    from engram.training.data import TokenBatcher
    from engram.training.loop import Trainer, TrainConfig

    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(store_dir, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    env = DistEnv(rank, world, torch.device("cpu"), dist.group.WORLD)
    tokens = np.random.default_rng(0).integers(0, 97, 4000)
    cfg = TrainConfig(batch_size=8, seq_len=16, max_steps=4, warmup_steps=1, grad_clip=0.05, grad_accum=2, lr=1e-2)
    evals = [(torch.from_numpy(tokens[:64].reshape(4, 16)), torch.from_numpy(tokens[1:65].reshape(4, 16)))]
    # the lookup alone: rows and their gradients equal the whole table's
    ref_model, model = tiny_gpt(sparse=True), tiny_gpt(sparse=True)
    table = ref_model.engram_layers()[0].memory
    sh = RowShardedEmbedding(table.sizes, table.embedding_dim, env, sparse=True)
    sh.load_full(table.embedding.weight.detach())
    def ids_of(r: int) -> torch.Tensor:  # (2, 5, H), different on every rank
        g = torch.Generator().manual_seed(r)
        return torch.stack([torch.randint(0, s, (2, 5), generator=g) for s in table.sizes], -1)

    ids = ids_of(rank)
    rows = sh(ids)
    lookup_equal = torch.equal(rows, table(ids))
    rows.pow(2).sum().backward()
    # single-process: every rank's ids in one batch, mean over ranks
    (sum(table(ids_of(r)).pow(2).sum() for r in range(world)) / world).backward()
    grad_equal = torch.allclose(sh.shard.grad.to_dense(), sh.take_rows(table.embedding.weight.grad.to_dense()), atol=1e-6)
    # training: N ranks on the global batch == one process on it
    ref = Trainer(ref_model, TokenBatcher(tokens, 8, 16, 0), cfg, evals)
    ref.optimizers[0].zero_grad(set_to_none=True)
    ref_model.zero_grad(set_to_none=True)
    dt = DistributedTrainer(model, TokenBatcher(tokens, 8, 16, 0), cfg, env, evals)
    for _ in range(cfg.max_steps):
        ref.train_step()
        dt.train_step()
    ref_val, dist_val = ref.evaluate(), dt.evaluate()
    ref_sd = ref_model.state_dict()
    dense_diff = max(float((ref_sd[k] - v).abs().max()) for k, v in model.state_dict().items()
                     if k in ref_sd and v.is_floating_point() and "memory" not in k)
    mem = dt.storages[0]
    table_diff = float((mem.shard.detach() - mem.take_rows(ref_model.engram_layers()[0].memory.embedding.weight.detach())).abs().max())
    report = dt.summary()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "lookup_equal": lookup_equal, "grad_equal": grad_equal, "dense_diff": dense_diff, "table_diff": table_diff,
        "ref_val": ref_val, "dist_val": dist_val, "ref_losses": ref.losses, "dist_losses": dt.losses,
        "tokens": dt.tokens, "ref_tokens": ref.tokens, "shard_rows": mem.shard.shape[0], "rows": mem.num_rows, "dim": mem.embedding_dim,
        "report": {k: report[k] for k in ("world_size", "table_bytes_per_rank", "table_bytes_by_rank",
                                          "lookup_bytes_per_step")}}))
    dist.destroy_process_group()


@pytest.mark.slow  # a fresh Python process (~5 s): CI runs it after the default tests
def test_two_ranks_look_up_and_train_as_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["lookup_equal"] and r["grad_equal"]
        assert r["dense_diff"] < 1e-4 and r["table_diff"] < 1e-4, (r["dense_diff"], r["table_diff"])  # reduction order aside
        assert abs(r["ref_val"] - r["dist_val"]) < 2e-3
        np.testing.assert_allclose(r["dist_losses"], r["ref_losses"], atol=1e-5)
        assert r["tokens"] == r["ref_tokens"]  # the global batch
        assert abs(r["shard_rows"] - r["rows"] / 2) <= len(tiny_gpt(True).engram_layers()[0].memory.sizes)
        rep = r["report"]
        assert rep["world_size"] == 2 and rep["table_bytes_per_rank"] == max(rep["table_bytes_by_rank"])
        assert sum(rep["table_bytes_by_rank"]) == r["rows"] * r["dim"] * 4 and rep["lookup_bytes_per_step"] > 0


# ---------------------------------------------------------------------- torchrun, the command line
def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", ENGRAM_DIST_TIMEOUT="30", PYTHONPATH=str(REPO))
    env["ENGRAM_CACHE_DIR"] = os.environ.get("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    return env


def _torchrun(tmp_path: Path, args: list[str], nproc: int = 2, script: list[str] | None = None,
              timeout: float = 240, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *(script or ["-m", "engram"]), *args]
    return subprocess.run(cmd, cwd=tmp_path, env={**_env(tmp_path), **(extra_env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def _one(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engram", *args], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=240)


def _flags(text_file: Path) -> list[str]:
    return ["train", "--data", str(text_file), *TINY, "--eval-points", "3"]


def _full_state(run: Path) -> tuple[dict, dict]:
    from engram.training.checkpoint import load_checkpoint

    ck = load_checkpoint(run, load_training_state=True)
    return ck.model.state_dict(), ck.training_state


@pytest.mark.slow
def test_torchrun_train_matches_one_process_and_reports_per_rank_memory(tmp_path, text_file):
    one = _one(tmp_path, [*_flags(text_file), "--steps", "6", "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = _torchrun(tmp_path, [*_flags(text_file), "--steps", "6", "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert [c["step"] for c in a["curve"]] == [c["step"] for c in b["curve"]]
    for x, y in zip(a["curve"], b["curve"]):
        assert abs(x["val_loss"] - y["val_loss"]) < 2e-3
    assert a["tokens"] == b["tokens"]
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert a["table_bytes_per_rank"] == sum(b["table_bytes_by_rank"])  # the whole table, split in two
    assert b["table_bytes_per_rank"] <= a["table_bytes_per_rank"] / 2 + 8 * 32 * 4  # about half (a few rows)
    ck = tmp_path / "two" / "checkpoints" / "step-00000006"
    assert sorted(p.name for p in (ck / "tables").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    manifest = json.loads((ck / "manifest.json").read_text())["files"]
    assert "tables/__1_0.distcp" in manifest  # the shards are covered by the checksums


@pytest.mark.slow
def test_sharded_checkpoints_resume_at_the_same_and_at_other_world_sizes(tmp_path, text_file):
    flags = [*_flags(text_file), "--steps", "6", "--checkpoint-every", "3"]
    r = _torchrun(tmp_path, [*flags, "--out", str(tmp_path / "two")])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _one(tmp_path, [*flags, "--out", str(tmp_path / "one")])
    assert r.returncode == 0, r.stderr

    def cut(src: str, dst: str) -> Path:  # the run as a kill after step 3 leaves it
        import shutil

        shutil.copytree(tmp_path / src, tmp_path / dst)
        shutil.rmtree(tmp_path / dst / "checkpoints" / "step-00000006")
        (tmp_path / dst / "checkpoints" / "latest").write_text("step-00000003\n")
        return tmp_path / dst

    resumes = {"2to2": _torchrun(tmp_path, ["train", "--resume", str(cut("two", "2to2")), "--no-progress"]),
               "2to1": _one(tmp_path, ["train", "--resume", str(cut("two", "2to1")), "--no-progress"]),
               "1to2": _torchrun(tmp_path, ["train", "--resume", str(cut("one", "1to2")), "--no-progress"])}
    for name, r in resumes.items():
        assert r.returncode == 0, (name, r.stderr[-3000:])
    whole, whole_state = _full_state(tmp_path / "two")
    same, same_state = _full_state(tmp_path / "2to2")
    assert all(torch.equal(whole[k], same[k]) for k in whole)  # bit-identical at the same world size
    for sd_a, sd_b in zip(whole_state["optimizers"], same_state["optimizers"]):
        for i, st in sd_a["state"].items():
            for k, v in st.items():
                assert torch.equal(v, sd_b["state"][i][k]) if torch.is_tensor(v) else v == sd_b["state"][i][k]
    assert [c["val_loss"] for c in whole_state["curve"]] == [c["val_loss"] for c in same_state["curve"]]
    one, _ = _full_state(tmp_path / "one")
    for name, ref in (("2to1", whole), ("1to2", one)):
        got, state = _full_state(tmp_path / name)
        assert max(float((ref[k] - got[k]).abs().max()) for k in ref if ref[k].is_floating_point()) < 1e-4, name
        ref_curve = json.loads((tmp_path / ("two" if name == "2to1" else "one") / "report.json").read_text())["curve"]
        for x, y in zip(ref_curve, state["curve"]):
            assert abs(x["val_loss"] - y["val_loss"]) < 2e-3


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_resharded_is_refused_clearly(tmp_path, text_file):
    r = _torchrun(tmp_path, [*_flags(text_file), "--steps", "2", "--out", str(tmp_path / "run")])
    assert r.returncode == 0, r.stderr[-3000:]
    ck = tmp_path / "run" / "checkpoints" / "step-00000002"
    # shards of a different table (another --table-size): the index names the same keys, other shapes
    meta = ck / "tables" / ".metadata"
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(ck / "tables")).read_metadata()
    key = next(k for k in md.state_dict_metadata if k.startswith("tables."))
    md.state_dict_metadata[key].size = torch.Size([5, 32])
    import pickle

    meta.write_bytes(pickle.dumps(md))
    from engram.training.checkpoint import write_manifest

    write_manifest(ck)  # a consistent checkpoint, whose shards do not fit this model
    for cmd in (lambda: _torchrun(tmp_path, ["train", "--resume", str(tmp_path / "run"), "--steps", "4",
                                             "--no-progress"]),
                lambda: _one(tmp_path, ["train", "--resume", str(tmp_path / "run"), "--steps", "4",
                                        "--no-progress"])):
        r = cmd()
        assert r.returncode != 0
        assert "cannot be resharded" in r.stderr or "cannot read its table shards" in r.stderr, r.stderr[-2000:]


DIE = """
import os, sys, torch.distributed as dist
import engram.distributed.trainer as t
when = os.environ["DIE_AT"]
if when == "step":
    step = t.DistributedTrainer.train_step
    def dying(self):
        if self.env.rank == 1 and self.step == 3:
            os._exit(3)
        return step(self)
    t.DistributedTrainer.train_step = dying
else:  # inside the save of step 4, after rank 0 has started writing
    import torch.distributed.checkpoint as dcp
    save = dcp.save
    def dying_save(*a, **k):
        if dist.get_rank() == 1 and "00000004" in str(k.get("checkpoint_id")):
            os._exit(3)
        return save(*a, **k)
    dcp.save = dying_save
from engram.cli.main import main
sys.argv[0] = "engram"
raise SystemExit(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("when", ["step", "save"])
def test_a_dying_rank_stops_the_others_and_leaves_no_half_checkpoint(tmp_path, text_file, when):
    script = tmp_path / "die.py"
    script.write_text(DIE)
    t0 = time.monotonic()
    r = _torchrun(tmp_path, [*_flags(text_file), "--steps", "8", "--checkpoint-every", "2",
                             "--out", str(tmp_path / "run")], script=[str(script)], timeout=120,
                  extra_env={"DIE_AT": when})
    assert r.returncode != 0
    assert time.monotonic() - t0 < 90  # within the collectives' timeout (30 s here), not for ever
    assert "exitcode:3" in r.stderr.replace(" ", ""), r.stderr[-2000:]
    # the survivor says what happened (a peer died during a step, or while the shards were written)
    assert "engram: error: rank 0:" in r.stderr and "stopping this rank too" in r.stderr, r.stderr[-2000:]
    from engram.training.checkpoint import is_complete, latest_checkpoint

    latest = latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.name == "step-00000002" and is_complete(latest)
    steps = [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert all(is_complete(p) for p in steps)  # no half-written checkpoint; a .tmp- leftover at most
    r = _one(tmp_path, ["train", "--resume", str(tmp_path / "run"), "--no-progress"])  # continues in one process
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------- the transformers Trainer under torchrun
@pytest.mark.slow
def test_hf_trainer_under_torchrun_keeps_replicated_tables_in_sync_and_equals_one_process(tmp_path):
    """EngramForCausalLM + EngramTrainer under torchrun (accelerate's DDP, gloo): the tables stay
    replicated (their sparse gradients are all-reduced by DDP), every rank ends with the same weights,
    and 2 x 2 rows per step train as 1 x 4 rows in one process."""
    worker = str(REPO / "tests" / "hf_ddp_worker.py")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    r = subprocess.run([sys.executable, worker, str(tmp_path / "one"), "4", "1"], cwd=tmp_path, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun(tmp_path, [str(tmp_path / "two"), "2", "1"], script=[worker])
    assert r.returncode == 0, r.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"rank{i}.pt") for i in range(2)]
    assert ranks[0]["world"] == 2 and one["world"] == 1
    for a, b in zip(ranks[0]["tables"], ranks[1]["tables"]):
        assert torch.equal(a, b)  # replicas in sync
    for k, v in ranks[0]["dense"].items():
        assert torch.equal(v, ranks[1]["dense"][k])
    for a, b in zip(one["tables"], ranks[0]["tables"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for k, v in one["dense"].items():
        torch.testing.assert_close(v, ranks[0]["dense"][k], atol=1e-5, rtol=0)
    np.testing.assert_allclose(one["losses"], ranks[0]["losses"], atol=1e-4)


def test_size_plans_per_rank():
    from engram.config import EngramConfig
    from engram.training.sizing import plan_per_rank, plan_tables

    cfg = EngramConfig(hidden_size=64, layer_ids=[1, 3], max_ngram_size=3, n_embed_per_ngram=32, n_head_per_ngram=4,
                       engram_vocab_size=[2, 2])
    plan = plan_tables(cfg, table_params=2 * 8 * 8 * 1000)  # 2 layers x 8 heads x d=8 x 1000 rows
    assert plan.rows_per_head == 1000
    rp = plan_per_rank(plan, 3, tokens_per_step=300, dtype="fp32")
    assert rp.rows_per_rank == 2 * 8 * 334  # ceil(1000 / 3) rows of each of the 16 heads
    assert rp.table_bytes_per_rank["fp32"] == 2 * 8 * 334 * 8 * 4
    assert rp.adam_state_bytes_per_rank == 2 * rp.table_bytes_per_rank["fp32"]
    assert rp.lookups_per_step_per_rank == 100 * 16  # 100 tokens per rank, 16 heads in all
    assert rp.exchange_bytes_per_step_per_rank == int(1600 * 2 / 3 * (8 + 2 * 8 * 4))
    with pytest.raises(ValueError, match="world_size"):
        plan_per_rank(plan, 0)


def test_table_shards_are_not_unpickled_from_a_directory_others_can_write(tmp_path):
    """DCP's .metadata is a pickle: a checkpoint whose tables/ another user could have written is
    refused before anything is read (the planted pickle's side effect never happens)."""
    import os
    import pickle

    from engram.training.shards import TABLES_DIR, _dcp_load, check_pickle_safe

    ran = tmp_path / "pickle-ran"

    class Planted:
        def __reduce__(self):
            return (open, (str(ran), "w"))

    root = tmp_path / "step-00000002"
    (root / TABLES_DIR).mkdir(parents=True)
    (root / TABLES_DIR / ".metadata").write_bytes(pickle.dumps(Planted()))
    (root / TABLES_DIR / "__0_0.distcp").write_bytes(b"")
    paths = [root, root / TABLES_DIR, root / TABLES_DIR / ".metadata", root / TABLES_DIR / "__0_0.distcp"]
    for p in paths:
        os.chmod(p, 0o700 if p.is_dir() else 0o600)
    check_pickle_safe(root)  # private: allowed
    for p in paths:
        os.chmod(p, os.stat(p).st_mode | 0o022)  # group- and other-writable
        with pytest.raises(ValueError, match="writable by other users"):
            _dcp_load({}, root)
        os.chmod(p, os.stat(p).st_mode & ~0o022)
    assert not ran.exists()
