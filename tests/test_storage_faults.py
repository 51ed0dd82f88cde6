"""Reliability of disk tables: content checksum, dirty marks, header validation, truncation,
atomic table sets, the overwrite guard, stale temporaries, and the offload benchmark's checkpoint.

Every test makes its files under pytest's ``tmp_path``; processes that must die (a crashed
writer, a SIGBUS) are forked children, so a regression fails the test instead of killing pytest.
"""

from __future__ import annotations

import ast
import copy
import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engram import MultiHeadEmbedding
from engram.offload import DiskMultiHeadEmbedding, offload, table_path
from engram.storage import tablefile
from engram.storage.stores import DiskRowStore

from test_offload import tiny_model

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model_a():
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def model_b():
    return tiny_model(seed=1)  # same config and hashing, other rows


def meta_copy(model):
    """``model`` with its tables on the meta device: offload(..., "disk") opens the files."""
    m = copy.deepcopy(model)
    for b in m.blocks:
        if b.engram is not None:
            mem = b.engram.memory
            b.engram.memory = MultiHeadEmbedding(mem.sizes, mem.embedding_dim, device="meta")
    return m


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def table(path: Path, rows: int = 600, dim: int = 16, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed))
    DiskMultiHeadEmbedding.write(path, w, [rows // 3, rows - rows // 3]).close()
    return w


def run_child(fn, timeout: float = 60.0) -> int:
    """Run ``fn()`` in a forked child; its exit code (``-signal`` if a signal killed it)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 99
        try:
            code = fn()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child process hung")
        time.sleep(0.01)


def rewrite_header(path: Path, change) -> None:
    """Replace the JSON header of ``path`` by ``change(header)`` (a dict, or raw bytes)."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[8:16], "little")
    new = change(json.loads(data[16 : 16 + n]))
    blob = new if isinstance(new, bytes) else json.dumps(new).encode()
    head = tablefile.MAGIC + len(blob).to_bytes(8, "little") + blob
    assert len(head) <= tablefile.ALIGN
    data[: tablefile.ALIGN] = head.ljust(tablefile.ALIGN, b"\0")
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------- 1. checksum
def test_corrupted_rows_fail_the_checksum_with_a_clear_error(tmp_path, model_a):
    offload(copy.deepcopy(model_a), "disk", path=tmp_path)
    f = table_path(tmp_path, 2)
    header = json.loads(f.read_bytes()[16 : 16 + int.from_bytes(f.read_bytes()[8:16], "little")])
    assert header["checksum"].startswith(tablefile.CHECKSUM_PREFIX) and header["dirty"] is None
    rng = np.random.default_rng(0)
    size = f.stat().st_size
    where = rng.choice(np.arange(tablefile.ALIGN, size), 1000, replace=False)  # rows only, header intact
    fd = os.open(f, os.O_RDWR)
    try:
        for off, byte in zip(where.tolist(), rng.integers(0, 256, 1000).tolist()):
            old = os.pread(fd, 1, off)[0]
            os.pwrite(fd, bytes([byte if byte != old else (old + 1) % 256]), off)
    finally:
        os.close(fd)
    with pytest.raises(ValueError, match=r"engram_layer2\.table is corrupt.*checksum.*verify=False"):
        offload(meta_copy(model_a), "disk", path=tmp_path)
    with pytest.raises(ValueError, match="corrupt"):
        DiskMultiHeadEmbedding(f)
    DiskMultiHeadEmbedding(f, verify=False)  # huge tables / the caller's choice: no check
    m = offload(meta_copy(model_a), "disk", path=tmp_path, verify=False)
    assert not torch.equal(logits(m), logits(model_a))  # the damage is real; verify=False reads it
    DiskMultiHeadEmbedding(table_path(tmp_path, 0))  # the other layer is intact


def test_write_rows_marks_dirty_until_flush_and_reseals(tmp_path):
    path = tmp_path / "t.table"
    w = table(path)
    mem = DiskMultiHeadEmbedding(path)
    before = mem.store.header["checksum"]
    rows, vals = torch.tensor([3, 450]), torch.randn(2, 16)
    mem.write_rows(rows, vals)
    fd = os.open(path, os.O_RDONLY)
    on_disk = tablefile.read_header(fd, path)
    os.close(fd)
    assert on_disk["dirty"]["pid"] == os.getpid() and on_disk["checksum"] is None
    same_process = DiskMultiHeadEmbedding(path)  # our own writer: opens (unverified), sees the new rows
    assert torch.equal(same_process.to_memory().embedding.weight[rows], vals)
    mem.flush()
    fd = os.open(path, os.O_RDONLY)
    sealed = tablefile.read_header(fd, path)
    os.close(fd)
    assert sealed["dirty"] is None and sealed["checksum"] not in (None, before)
    w[rows] = vals
    assert torch.equal(DiskMultiHeadEmbedding(path).to_memory().embedding.weight, w)  # verifies
    with pytest.raises(ValueError, match=r"row ids must be in \[0, 600\)"):
        mem.write_rows(torch.tensor([600]), torch.randn(1, 16))
    mem.close()
    with pytest.raises(ValueError, match="closed"):
        mem(torch.zeros(1, 1, 2, dtype=torch.long))


def test_dirty_table_left_by_a_crashed_writer_is_refused(tmp_path):
    path = tmp_path / "t.table"
    w = table(path)
    vals = torch.randn(1, 16)

    def crash() -> int:  # write rows, then die without flush/close (no finalizers run, as with kill -9)
        mem = DiskMultiHeadEmbedding(path)
        mem.write_rows(torch.tensor([7]), vals)
        os._exit(0)

    assert run_child(crash) == 0
    with pytest.raises(ValueError, match=r"t\.table is marked dirty: process \d+ wrote rows into it and did not "
                                         r"flush or close it.*verify=False"):
        DiskMultiHeadEmbedding(path)
    mem = DiskMultiHeadEmbedding(path, verify=False)  # the caller's choice
    mem.flush()  # re-seal with a fresh checksum
    w[7] = vals
    assert torch.equal(DiskMultiHeadEmbedding(path).to_memory().embedding.weight, w)


def test_failed_row_write_leaves_the_dirty_mark(tmp_path, monkeypatch):
    path = tmp_path / "t.table"
    table(path)
    mem = DiskMultiHeadEmbedding(path)
    real = os.pwrite

    def pwrite(fd, data, offset):  # the header (first page) is written, the rows do not fit
        if offset >= tablefile.ALIGN:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError, match=r"No space left on device while writing rows into .*t\.table.*marked dirty"):
        mem.write_rows(torch.tensor([1]), torch.ones(1, 16))
    monkeypatch.setattr(os, "pwrite", real)
    with pytest.raises(ValueError, match="failed half-way"):
        mem.flush()
    with pytest.warns(RuntimeWarning, match="stays marked dirty"):
        mem.close()
    with pytest.raises(ValueError, match="marked dirty"):
        DiskMultiHeadEmbedding(path)
    DiskMultiHeadEmbedding(path, verify=False).close()  # close() flushes: re-sealed
    DiskMultiHeadEmbedding(path)


def test_format_version_1_files_open_and_upgrade_on_write(tmp_path):
    path = tmp_path / "t.table"
    w = table(path)
    rewrite_header(path, lambda h: {**{k: v for k, v in h.items() if k not in ("table_id", "checksum", "dirty")},
                                    "version": 1})
    mem = DiskMultiHeadEmbedding(path)  # nothing to verify against: opens
    assert torch.equal(mem.to_memory().embedding.weight, w)
    mem.write_rows(torch.tensor([0]), torch.zeros(1, 16))
    mem.close()
    fd = os.open(path, os.O_RDONLY)
    header = tablefile.read_header(fd, path)
    os.close(fd)
    assert header["version"] == tablefile.VERSION and header["checksum"] and header["table_id"]
    w[0] = 0
    assert torch.equal(DiskMultiHeadEmbedding(path).to_memory().embedding.weight, w)


# ---------------------------------------------------------------------------------- 2. header
BAD_HEADERS = {
    "no file_size": (lambda h: {k: v for k, v in h.items() if k != "file_size"}, "no 'file_size' field"),
    "no sizes": (lambda h: {k: v for k, v in h.items() if k != "sizes"}, "no 'sizes' field"),
    "no parts": (lambda h: {k: v for k, v in h.items() if k != "parts"}, "no 'parts' field"),
    "file_size text": (lambda h: {**h, "file_size": "big"}, "field 'file_size' is invalid"),
    "file_size wrong": (lambda h: {**h, "file_size": h["file_size"] + 4096}, "field 'file_size' is invalid"),
    "sizes negative": (lambda h: {**h, "sizes": [-1, 601]}, "field 'sizes' is invalid"),
    "num_rows wrong": (lambda h: {**h, "num_rows": 7}, "field 'num_rows' is invalid"),
    "offset past end": (lambda h: {**h, "parts": {"weight": {**h["parts"]["weight"], "offset": 10**9}}},
                        "field 'parts' is invalid"),
    "unknown codec": (lambda h: {**h, "codec": {"codec": "int3", "dtype": "float32"}}, "field 'codec' is invalid"),
    "dtype not a dtype": (lambda h: {**h, "codec": {"codec": "none", "dtype": "Tensor"}}, "field 'codec' is invalid"),
    "no checksum": (lambda h: {k: v for k, v in h.items() if k != "checksum"}, "no 'checksum' field"),
    "bad checksum": (lambda h: {**h, "checksum": "md5:00"}, "field 'checksum' is invalid"),
    "newer version": (lambda h: {**h, "version": 99}, "format version 99"),
    "foreign format": (lambda h: {**h, "format": "zip"}, "field 'format' is invalid"),
    "json list": (lambda h: b"[1, 2]", "corrupt header.*JSON list"),
    "not json": (lambda h: b"{'a':", "corrupt header.*not JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_missing_or_invalid_header_fields_are_named(tmp_path, case):
    path = tmp_path / "t.table"
    table(path)
    change, msg = BAD_HEADERS[case]
    rewrite_header(path, change)
    with pytest.raises(ValueError, match=f"t\\.table.*{msg}"):
        DiskMultiHeadEmbedding(path)


def test_foreign_and_cut_off_headers(tmp_path):
    path = tmp_path / "t.table"
    table(path)
    full = path.read_bytes()
    cases = {"short.table": (full[:40], "truncated header"),
             "empty.table": (b"", "not an Engram table file"),
             "foreign.table": (b"PK\x03\x04" + bytes(5000), "not an Engram table file"),
             "hugelen.table": (full[:8] + (2**62).to_bytes(8, "little") + full[16:], "header length field")}
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}.*{msg}"):
            DiskMultiHeadEmbedding(tmp_path / name)


# ---------------------------------------------------------------------------------- 3. truncation
def test_truncated_table_is_refused_at_open(tmp_path):
    path = tmp_path / "t.table"
    table(path)
    os.truncate(path, path.stat().st_size - 5000)
    with pytest.raises(ValueError, match=r"t\.table is truncated or damaged: its header says \d+ bytes"):
        DiskMultiHeadEmbedding(path, verify=False)


def test_table_truncated_while_mapped_raises_instead_of_sigbus(tmp_path):
    path = tmp_path / "t.table"
    w = table(path, rows=3000)
    mem = DiskMultiHeadEmbedding(path, verify=False)
    os.truncate(path, 2 * tablefile.ALIGN)  # the mapped rows past 4 KiB are gone
    h = torch.tensor([[[999, 1999]]])  # rows near the end of the file

    def read() -> int:
        try:
            mem(h)
        except ValueError as exc:
            return 0 if "truncated to 8192 bytes while open" in str(exc) else 2
        return 3

    code = run_child(read)
    assert code != -signal.SIGBUS, "reading a truncated mapped table killed the process with SIGBUS"
    assert code == 0
    with pytest.raises(ValueError, match="truncated.*SIGBUS"):
        mem(h)
    assert w.shape == (3000, 16)


# ---------------------------------------------------------------------------------- 4. table sets
def fail_on(name: str, monkeypatch) -> None:
    """Make the writer hit a full disk (``pwrite`` -> ENOSPC) while it writes a table whose path has ``name``."""
    real_stage, real_pwrite = DiskRowStore.stage.__func__, os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    def stage(cls, path, *args, **kwargs):
        if name not in str(path):
            return real_stage(cls, path, *args, **kwargs)
        os.pwrite = full
        try:
            return real_stage(cls, path, *args, **kwargs)
        finally:
            os.pwrite = real_pwrite

    monkeypatch.setattr(DiskRowStore, "stage", classmethod(stage))


def test_multi_layer_offload_full_disk_changes_nothing(tmp_path, model_a, model_b, monkeypatch):
    offload(copy.deepcopy(model_a), "disk", path=tmp_path)
    before = snapshot(tmp_path)
    fail_on("engram_layer2", monkeypatch)  # the second layer's table does not fit
    m = copy.deepcopy(model_b)
    with pytest.raises(OSError, match=r"No space left on device while writing the Engram table engram_layer2\.table "
                                      r"\(table 2 of 2\).*nothing in .* was changed") as info:
        offload(m, "disk", path=tmp_path, overwrite=True)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # layer 0 not replaced, no temporary left
    assert all(isinstance(b.engram.memory, MultiHeadEmbedding) for b in m.blocks if b.engram is not None)
    assert torch.equal(logits(offload(meta_copy(model_a), "disk", path=tmp_path)), logits(model_a))


def test_mixed_table_set_is_detected_on_open(tmp_path, model_a, model_b, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    offload(copy.deepcopy(model_a), "disk", path=a)
    offload(copy.deepcopy(model_b), "disk", path=b)
    assert (a / tablefile.MANIFEST).is_file()
    good = table_path(a, 2).read_bytes()
    table_path(a, 2).write_bytes(table_path(b, 2).read_bytes())  # layer 2 of another set (an old half-done write)
    with pytest.raises(ValueError, match=r"mixed set of Engram tables: engram_layer2\.table.*overwrite=True"):
        offload(meta_copy(model_a), "disk", path=a)
    table_path(a, 2).write_bytes(good)
    assert torch.equal(logits(offload(meta_copy(model_a), "disk", path=a)), logits(model_a))
    # interrupted between the manifest and the renames: the set on disk is flagged, not loaded
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if str(dst).endswith("engram_layer2.table"):
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="mixed set"):
        offload(copy.deepcopy(model_b), "disk", path=a, overwrite=True)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="mixed set"):
        offload(meta_copy(model_a), "disk", path=a)
    assert not [p for p in a.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------- 5. overwrite guard
def test_offload_refuses_to_replace_different_tables(tmp_path, model_a, model_b):
    trained = offload(copy.deepcopy(model_a), "disk", path=tmp_path)
    offload(copy.deepcopy(model_a), "disk", path=tmp_path)  # the same tables again: fine
    mem = trained.blocks[0].engram.memory
    mem.write_rows(torch.tensor([5]), torch.ones(1, mem.embedding_dim))  # "trained" rows
    mem.flush()
    before = snapshot(tmp_path)
    for other in (model_a, model_b):  # the untrained original, another model: both differ now
        with pytest.raises(ValueError, match=r"already holds Engram tables that differ.*engram_layer0\.table"
                                             r".*overwrite=True"):
            offload(copy.deepcopy(other), "disk", path=tmp_path)
        assert snapshot(tmp_path) == before
    reopened = offload(meta_copy(model_a), "disk", path=tmp_path)  # the trained tables still open
    assert torch.equal(logits(reopened), logits(trained))
    assert torch.equal(logits(offload(copy.deepcopy(model_b), "disk", path=tmp_path, overwrite=True)),
                       logits(model_b))
    assert torch.equal(logits(offload(meta_copy(model_b), "disk", path=tmp_path)), logits(model_b))


# ---------------------------------------------------------------------------------- 6. benchmark
def test_offload_bench_loads_its_checkpoint_safely():
    src = (ROOT / "benchmarks" / "offload_bench.py").read_text()
    tree = ast.parse(src)
    loads = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "load" and getattr(n.func.value, "id", None) == "torch"]
    assert loads, "torch.load is gone from the benchmark: update this test"
    for call in loads:
        kw = {k.arg: k.value for k in call.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
    ckpt = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "CKPT")
    text = ast.unparse(ckpt.value)
    assert "gettempdir" not in text and "/tmp" not in text and "ROOT" in text


# ---------------------------------------------------------------------------------- 7. temporaries
def test_stale_temporaries_are_removed_and_never_loaded(tmp_path, model_a):
    child = subprocess.Popen(["true"])
    child.wait()
    dead, alive = child.pid, os.getpid()
    junk = b"not a table: a writer died here"
    names = {f"engram_layer0.table.tmp-{dead}": False, f"engram_layer2.table.tmp-{dead}-0badf00d": False,
             f"{tablefile.MANIFEST}.tmp-{dead}": False,
             f"engram_layer0.table.tmp-{alive}-12345678": True,  # a live writer's: kept
             f"notes.txt.tmp-{dead}": True}  # not ours: kept
    for name in names:
        (tmp_path / name).write_bytes(junk)
    m = offload(copy.deepcopy(model_a), "disk", path=tmp_path)
    assert {n: (tmp_path / n).exists() for n in names} == names
    assert torch.equal(logits(m), logits(model_a))
    assert torch.equal(logits(offload(meta_copy(model_a), "disk", path=tmp_path)), logits(model_a))


def test_disk_table_copies_reopen_the_same_file(tmp_path, model_a):
    m = offload(copy.deepcopy(model_a), "disk", path=tmp_path)
    twin = copy.deepcopy(m)
    assert twin.blocks[0].engram.memory.store._fd != m.blocks[0].engram.memory.store._fd
    assert torch.equal(logits(twin), logits(model_a))
