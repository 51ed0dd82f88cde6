"""Prepared token corpora (engram prepare, engram.training.prepared), the memory-mapped batcher
and document boundaries in hashing: a packed row hashes as each of its documents alone."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engram import EngramConfig
from engram.core.hashing import NgramHashMapping
from engram.ops import cpu
from engram.ops.hash import doc_starts_from_segments, hash_ngrams
from engram.training import data, prepared
from helpers import tiny_gpt, tiny_tokenizer

KERNEL = cpu.available()
METHODS = ["plain"] + (["kernel"] if KERNEL else [])


# ---------------------------------------------------------------------- hashing with document starts
def mapping(n: int) -> NgramHashMapping:
    cfg = EngramConfig(hidden_size=32, layer_ids=[0, 2], max_ngram_size=n, n_embed_per_ngram=16, n_head_per_ngram=2,
                       engram_vocab_size=[211] * (n - 1), pad_id=1)
    return NgramHashMapping(cfg, tiny_tokenizer())


def packed(g: torch.Generator, n_docs: int, max_len: int = 6) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Documents (1, len) of random ids, their packed row (1, T) and its document starts (1, T)."""
    docs = [torch.randint(0, 97, (1, int(torch.randint(1, max_len + 1, (1,), generator=g))), generator=g)
            for _ in range(n_docs)]
    row = torch.cat(docs, 1)
    starts = torch.zeros(row.shape, dtype=torch.bool)
    o = 0
    for d in docs:
        starts[0, o] = True
        o += d.shape[1]
    return docs, row, starts


@pytest.mark.parametrize("n", [2, 3, 4])
def test_packed_row_hashes_as_each_document_alone(n):
    """Bit for bit, on every backend: the formula, the bulk C kernel and the fused C hash step."""
    m = mapping(n)
    g = torch.Generator().manual_seed(n)
    for _ in range(10):
        docs, row, starts = packed(g, 5)
        alone = [m.hash(d, method="plain") for d in docs]
        want = {lid: torch.cat([a[lid] for a in alone], 1) for lid in m.layer_ids}  # (1, T, H)
        for method in METHODS:
            got = m.hash(row, method=method, doc_starts=starts)
            assert all(torch.equal(got[lid], want[lid]) for lid in want), method
        # a history before the row is discarded by the start at position 0
        hist = torch.randint(0, 48, (1, n - 1), generator=g)
        fused, nxt = m.hash_step(row, hist, doc_starts=starts)  # C kernel where available
        tensor, nxt_t = m._step_tensor(row, hist, None, False, starts)
        assert all(torch.equal(fused[lid], want[lid]) and torch.equal(tensor[lid], want[lid]) for lid in want)
        # the next history is the last document's own (pad before its start)
        _, last_alone = m.hash_step(docs[-1], None)
        assert torch.equal(nxt, last_alone) and torch.equal(nxt_t, last_alone)


def test_no_start_continues_history_and_false_mask_changes_nothing():
    m = mapping(3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (3, 17), generator=g)
    hist = torch.randint(0, 48, (3, 2), generator=g)
    for method in METHODS:
        plain = m.hash_compressed(m.compress(ids), hist, method=method)
        off = m.hash_compressed(m.compress(ids), hist, method=method, doc_starts=torch.zeros(3, 17, dtype=torch.bool))
        assert all(torch.equal(plain[lid], off[lid]) for lid in plain)
    # a start inside the row: before it the row continues the history, from it on it is a new sequence
    starts = torch.zeros(3, 17, dtype=torch.bool)
    starts[:, 9] = True
    for method in METHODS:
        got = m.hash_compressed(m.compress(ids), hist, method=method, doc_starts=starts)
        head = m.hash_compressed(m.compress(ids[:, :9]), hist, method="plain")
        tail = m.hash_compressed(m.compress(ids[:, 9:]), None, method="plain")
        for lid in got:
            assert torch.equal(got[lid], torch.cat([head[lid], tail[lid]], 1))


def test_kernel_split_over_threads_honours_starts():
    """From PARALLEL_MIN_TOKENS the kernel splits the time axis: a split must see starts before it."""
    if not KERNEL:
        pytest.skip("no C kernels here")
    m = mapping(4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (4, 4096), generator=g)
    starts = torch.rand(4, 4096, generator=g) < 0.3
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, b = m.hash(ids, method="kernel", doc_starts=starts), m.hash(ids, method="plain", doc_starts=starts)
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(a[lid], b[lid]) for lid in a)


def test_segment_ids_and_bad_doc_starts():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert doc_starts_from_segments(seg).tolist() == [[False, False, True, False, False, True], [False] * 6]
    m = mapping(3)
    ids = torch.randint(0, 97, (2, 6))
    with pytest.raises(ValueError, match="doc_starts"):
        m.hash(ids, doc_starts=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="doc_starts"):
        m.hash_step(ids, doc_starts=torch.zeros(2, 6))  # float
    with pytest.raises(ValueError, match="keep_history"):
        m.hash_step(ids, doc_starts=torch.zeros(2, 6, dtype=torch.bool), keep_history=True)
    with pytest.raises(ValueError, match="doc_starts"):
        full = torch.zeros(2, 8, dtype=torch.long)
        hash_ngrams(full, m._cpu[0], m._cpu[1], doc_starts=torch.zeros(2, 7, dtype=torch.bool))


def test_model_takes_doc_starts(one_thread):
    """EngramGPT: doc_starts reaches the hash (same logits as per-document hash ids given directly);
    absent or all False it changes nothing."""
    model = tiny_gpt(sparse=False).eval()
    g = torch.Generator().manual_seed(3)
    rows = [packed(g, 4, max_len=5) for _ in range(2)]
    T = min(r[1].shape[1] for r in rows)
    x = torch.cat([r[1][:, :T] for r in rows])  # (2, T)
    starts = torch.cat([r[2][:, :T] for r in rows])  # (2, T)
    with torch.no_grad():
        base, _ = model(x)
        same, _ = model(x, doc_starts=None)
        off, _ = model(x, doc_starts=torch.zeros_like(starts))
        packed_logits, _ = model(x, doc_starts=starts)
        seg = torch.cumsum(starts.long(), 1)  # (2, T) segment ids
        per_doc = {}
        for b in range(2):  # hash each document alone, then give the model those rows
            parts = [model.hashing.hash(x[b : b + 1, (seg[b] == s).nonzero().flatten()]) for s in seg[b].unique()]
            for lid in parts[0]:
                per_doc.setdefault(lid, []).append(torch.cat([p[lid] for p in parts], 1))
        given, _ = model(x, hash_ids={lid: torch.cat(v) for lid, v in per_doc.items()})
    assert torch.equal(base, same) and torch.equal(base, off)
    assert torch.equal(packed_logits, given)
    assert not torch.equal(packed_logits, base)


# ---------------------------------------------------------------------- engram prepare
def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "cat", "sees", "a", "dog", "river", "moon", "old", "king", "song", "ship", "key", "Red", "éclair"]
    return ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "."
                      for _ in range(rng.randint(1, 4))) + "\n" for _ in range(n)]


def encode(tok, text: str) -> list[int]:
    return tok.backend_tokenizer.encode(text, add_special_tokens=False).ids


def split_docs(tokens: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    bounds = list(np.asarray(offsets)) + [len(tokens)]
    return [np.asarray(tokens[a:b]).tolist() for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.fixture
def corpus(tmp_path, ref_tokenizer):
    """A JSONL corpus of 40 documents prepared with the reference tokenizer, one held out in 5."""
    docs = make_docs(40)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)) + "\n")
    out = tmp_path / "prep"
    prepared.prepare_corpus([src], out, ref_tokenizer, eval_fraction=0.2)
    return docs, out


def test_prepare_jsonl_documents_offsets_split_and_header(corpus, ref_tokenizer):
    docs, out = corpus
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == prepared.FORMAT and meta["version"] == prepared.VERSION
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(ref_tokenizer) == 4096
    assert meta["tokenizer"]["fingerprint"] == data.tokenizer_fingerprint(ref_tokenizer)
    assert meta["sources"][0]["bytes"] == (out.parent / "docs.jsonl").stat().st_size
    c = prepared.open_prepared(out, ref_tokenizer)
    eos = ref_tokenizer.eos_token_id
    held = [d for i, d in enumerate(docs) if prepared._is_eval(i, 0.2)]
    kept = [d for i, d in enumerate(docs) if not prepared._is_eval(i, 0.2)]
    assert len(held) == 8 and len(kept) == 32
    for name, want in (("train", kept), ("eval", held)):
        s = c.splits[name]
        assert s.tokens.dtype == np.dtype("<u2") and isinstance(s.tokens, np.memmap)
        assert split_docs(s.tokens, s.doc_offsets) == [encode(ref_tokenizer, d) + [eos] for d in want]
        assert s.info["sha256"] == hashlib.sha256(Path(out / f"{name}.tokens").read_bytes()).hexdigest()
    assert not list(out.parent.glob(".prep.tmp-*"))  # the temporary directory was renamed


def test_text_files_blank_line_documents_and_file_tails(tmp_path, ref_tokenizer):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first doc line one\nline two\n\n  \n\nsecond doc\n\nthird doc, no final newline")
    b.write_text("".join(make_docs(30, seed=1)))
    # blank-line documents, no held-out split
    out = tmp_path / "blank"
    prepared.prepare_corpus([a], out, ref_tokenizer, doc_sep="blank-line", eval_fraction=0, eos=False)
    c = prepared.open_prepared(out, ref_tokenizer)
    assert set(c.splits) == {"train"}
    want = ["first doc line one\nline two\n", "second doc\n", "third doc, no final newline"]
    assert split_docs(c.splits["train"].tokens, c.splits["train"].doc_offsets) == [encode(ref_tokenizer, t) for t in want]
    # one document per file: the tail of each file from the first line start at 90% of its bytes is held out
    out = tmp_path / "files"
    prepared.prepare_corpus([b], out, ref_tokenizer, eval_fraction=0.1)
    c = prepared.open_prepared(out, ref_tokenizer)
    raw = b.read_bytes()
    q = raw.index(b"\n", int(len(raw) * 0.9) - 1) + 1
    head, tail = raw[:q].decode(), raw[q:].decode()
    assert np.asarray(c.splits["train"].tokens).tolist() == encode(ref_tokenizer, head)  # a cut: no eos
    assert np.asarray(c.splits["eval"].tokens).tolist() == encode(ref_tokenizer, tail) + [ref_tokenizer.eos_token_id]
    assert c.meta["splits"]["train"]["documents"] == 1 and c.meta["splits"]["eval"]["documents"] == 1


def test_long_documents_are_cut_deterministically_and_exactly(tmp_path, ref_tokenizer, monkeypatch):
    """Segments (here 200-2000 chars) and read blocks (here 300 bytes) change nothing: the ids equal
    encoding the whole document, and the files are byte-identical to a run with the real sizes."""
    text = "".join(make_docs(300, seed=2)).replace("\n", "  \n", 5)  # trailing spaces before a few breaks
    src = tmp_path / "long.txt"
    src.write_text(text)
    big = tmp_path / "big"
    prepared.prepare_corpus([src], big, ref_tokenizer, eval_fraction=0)
    monkeypatch.setattr(prepared, "SEGMENT_CHARS", 200)
    monkeypatch.setattr(prepared, "SEGMENT_CAP", 2000)
    monkeypatch.setattr(prepared, "READ_BYTES", 300)
    monkeypatch.setattr(prepared, "TASK_CHARS", 1000)
    small = tmp_path / "small"
    prepared.prepare_corpus([src], small, ref_tokenizer, eval_fraction=0)
    segs = list(prepared._segments(prepared.Source(src, "text", "train").events("file", "text", None, 0, None), 0,
                                   prepared._Stats()))
    assert len(segs) > 10 and "".join(s[1] for s in segs) == text
    for name in ("train.tokens", "train.docs"):
        assert (big / name).read_bytes() == (small / name).read_bytes()
    got = np.fromfile(small / "train.tokens", dtype="<u2").tolist()
    assert got == encode(ref_tokenizer, text) + [ref_tokenizer.eos_token_id]


def test_two_workers_write_the_same_files(tmp_path, ref_tokenizer, monkeypatch):
    monkeypatch.setattr(prepared, "TASK_CHARS", 2000)  # several tasks in flight
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"body": d}) + "\n" for d in make_docs(200, seed=3)))
    outs = []
    for w in (1, 2):
        outs.append(tmp_path / f"w{w}")
        prepared.prepare_corpus([src], outs[-1], ref_tokenizer, text_field="body", workers=w, eval_fraction=0.1)
    for name in ("train.tokens", "train.docs", "eval.tokens", "eval.docs"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_uint32_when_the_vocabulary_is_large(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70000)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w69999", pad_token="w0")
    src = tmp_path / "a.txt"
    src.write_text("w5 w65536 w69000\nw12 w7\n")
    prepared.prepare_corpus([src], tmp_path / "p", tok, eval_fraction=0)
    c = prepared.open_prepared(tmp_path / "p", tok)
    assert c.meta["dtype"] == "uint32" and c.splits["train"].tokens.dtype == np.dtype("<u4")
    assert np.asarray(c.splits["train"].tokens).tolist() == [5, 65536, 69000, 12, 7, 69999]


def test_input_errors_are_clear_and_leave_nothing(tmp_path, ref_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        prepared.prepare_corpus([bad], tmp_path / "o", ref_tokenizer)
    bad.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match="no 'text' field"):
        prepared.prepare_corpus([bad], tmp_path / "o", ref_tokenizer)
    latin = tmp_path / "l.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="byte 3"):
        prepared.prepare_corpus([latin], tmp_path / "o", ref_tokenizer)
    with pytest.raises(ValueError, match="held-out split is empty"):
        prepared.prepare_corpus([latin], tmp_path / "o", ref_tokenizer, encoding="latin-1", eval_fraction=0.5)
    with pytest.raises(ValueError, match="does not exist"):
        prepared.prepare_corpus([tmp_path / "none.txt"], tmp_path / "o", ref_tokenizer)
    with pytest.raises(ValueError, match="not both"):
        prepared.prepare_corpus([latin], tmp_path / "o", ref_tokenizer, eval_inputs=[latin], eval_fraction=0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "l.txt"]  # no output, no temporaries
    pq = tmp_path / "x.parquet"
    pq.write_bytes(b"PAR1")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ValueError, match="datasets"):
            prepared.prepare_corpus([pq], tmp_path / "o", ref_tokenizer)


def test_output_is_never_clobbered_silently(corpus, tmp_path, ref_tokenizer):
    _, out = corpus
    src = out.parent / "docs.jsonl"
    before = (out / "train.tokens").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepared.prepare_corpus([src], out, ref_tokenizer)
    prepared.prepare_corpus([src], out, ref_tokenizer, eval_fraction=0.5, overwrite=True)
    assert (out / "train.tokens").read_bytes() != before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a directory written by engram prepare"):
        prepared.prepare_corpus([src], other, ref_tokenizer, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------- reading it back
def test_memmap_batcher_matches_token_batcher_and_marks_documents(corpus, ref_tokenizer):
    _, out = corpus
    c = prepared.open_prepared(out, ref_tokenizer)
    tr = c.splits["train"]
    mm = c.batcher(batch_size=4, seq_len=16, seed=7)
    ref = data.TokenBatcher(np.asarray(tr.tokens).astype(np.int32), 4, 16, seed=7)
    offsets = set(np.asarray(tr.doc_offsets).tolist())
    for step in (0, 1, 5):
        x, y = mm.batch(step)
        rx, ry = ref.batch(step)
        assert x.dtype == torch.int64 and torch.equal(x, rx) and torch.equal(y, ry)
        x2, y2, starts = mm.batch_with_boundaries(step)
        assert torch.equal(x2, x) and torch.equal(y2, y) and starts.shape == x.shape and starts.dtype == torch.bool
        begin = data.window_starts(len(tr.tokens), 4, 16, 7, step)
        for b in range(4):
            want = [int(begin[b]) + t in offsets for t in range(16)]
            assert starts[b].tolist() == want
    assert ref.batch_with_boundaries(0)[2] is None
    ev = c.splits["eval"]
    got = c.eval_batches(batch_size=3, seq_len=8, max_tokens=64)
    want = data.eval_batches(np.asarray(ev.tokens), 3, 8, 64)
    assert len(got) == len(want)
    for gb, (wx, wy) in zip(got, want):
        gx, gy = gb
        assert torch.equal(gx, wx) and torch.equal(gy, wy) and gb.doc_starts.shape == gx.shape


def test_prepare_data_flag_reads_a_prepared_directory(corpus, ref_tokenizer, tmp_path):
    from engram.cli.flags import prepare_data

    _, out = corpus
    args = argparse.Namespace(data=[str(out)], eval_data=None, dataset=None, tokenizer=None, vocab_size=4096,
                              encoding=None, eval_tokens=64)
    tok, batcher, evals, info = prepare_data(args, 2, 8, 0)
    assert isinstance(batcher, data.MemmapBatcher) and data.tokenizer_fingerprint(tok) == info["tokenizer_fingerprint"]
    assert info["train_sha256"] == json.loads((out / "meta.json").read_text())["splits"]["train"]["sha256"]
    assert evals and all(isinstance(b, data.Batch) for b in evals)
    x, y = batcher.batch(0)
    assert x.shape == (2, 8)
    args.tokenizer = str(out / "tokenizer")
    assert prepare_data(args, 2, 8, 0)[3]["train_tokens"] == info["train_tokens"]
    args.eval_data = [str(out / "meta.json")]
    with pytest.raises(ValueError, match="--eval-data"):
        prepare_data(args, 2, 8, 0)


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "train.tokens").write_bytes((out / "train.tokens").read_bytes()[:-2]), "truncated"),
    (lambda out: (out / "train.tokens").write_bytes((out / "train.tokens").read_bytes() + b"\0\0"), "longer than recorded"),
    (lambda out: (out / "eval.docs").write_bytes(b""), "eval.docs is 0 bytes"),
    (lambda out: (out / "meta.json").unlink(), "no meta.json"),
    (lambda out: (out / "meta.json").write_text("{not json"), "not readable JSON"),
    (lambda out: (out / "meta.json").write_text((out / "meta.json").read_text().replace('"version": 1', '"version": 9')),
     "format version 9"),
    (lambda out: (out / "train.tokens").unlink(), "train.tokens is missing"),
])
def test_damaged_prepared_data_is_refused(corpus, ref_tokenizer, damage, message):
    _, out = corpus
    damage(out)
    with pytest.raises(ValueError, match=message):
        prepared.open_prepared(out, ref_tokenizer)


def test_ids_beyond_the_vocabulary_and_changed_bytes_are_caught(corpus, ref_tokenizer):
    _, out = corpus
    tokens = np.fromfile(out / "train.tokens", dtype="<u2")
    tokens[10] = 5000  # >= 4096
    tokens.tofile(out / "train.tokens")
    with pytest.raises(ValueError, match="holds id 5000 at token 10"):
        prepared.open_prepared(out, ref_tokenizer)
    c = prepared.open_prepared(out, ref_tokenizer, verify=False)  # the batcher checks its windows too
    with pytest.raises(ValueError, match="id 5000"):
        data.read_windows(c.splits["train"].tokens, np.array([0]), 20, 4096)
    tokens[10] = 7  # a valid id, but not the one written
    tokens.tofile(out / "train.tokens")
    with pytest.raises(ValueError, match="SHA-256"):
        prepared.open_prepared(out, ref_tokenizer)


def test_another_tokenizer_is_refused(corpus, ref_tokenizer):
    import copy

    _, out = corpus
    other = copy.deepcopy(ref_tokenizer)
    other.add_tokens(["zzqqx"])
    with pytest.raises(ValueError, match="not the tokenizer .* was prepared with"):
        prepared.open_prepared(out, other)
    from engram.cli.flags import prepare_data

    with pytest.raises(ValueError, match="checkpoint's tokenizer"):
        prepare_data(argparse.Namespace(data=[str(out)], eval_data=None, dataset=None, tokenizer=None,
                                        encoding=None, eval_tokens=64), 2, 8, 0, other)
    # the saved tokenizer is checked too, and its fingerprint survives save/load
    tok_json = out / "tokenizer" / "tokenizer.json"
    spec = json.loads(tok_json.read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    tok_json.chmod(0o644)
    tok_json.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="not the tokenizer"):
        prepared.open_prepared(out, verify=False).load_tokenizer()


def test_cli_prepare_end_to_end(tmp_path, monkeypatch, capsys, ref_tokenizer):
    from engram.cli.main import main

    src = tmp_path / "a.txt"
    src.write_text("\n\n".join(d for d in make_docs(60, seed=5)))
    out = tmp_path / "out"
    ref = str(Path(__file__).parent / "fixtures" / "reference" / "tokenizer-bpe4096")
    rc = main(["prepare", str(src), "--out", str(out), "--tokenizer", ref, "--doc-sep", "blank-line",
               "--eval-fraction", "0.1", "--workers", "1", "--no-progress"])
    assert rc == 0
    assert f"prepared {out}" in capsys.readouterr().out
    c = prepared.open_prepared(out)
    assert c.splits["train"].info["documents"] == 54 and c.splits["eval"].info["documents"] == 6
    assert main(["prepare", str(src), "--out", str(out), "--tokenizer", ref, "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_on_prepared_data(tmp_path):
    """``engram train --data DIR`` end to end, and a prepared directory of another tokenizer refused."""
    src = tmp_path / "a.txt"
    src.write_text("".join(make_docs(400, seed=6)))
    out = tmp_path / "prep"
    env = {**os.environ, "ENGRAM_CACHE_DIR": str(tmp_path / "cache")}
    run = [sys.executable, "-m", "engram"]
    subprocess.run(run + ["prepare", str(src), "--out", str(out), "--vocab-size", "300", "--workers", "2",
                          "--eval-fraction", "0.1", "--no-progress"], check=True, env=env)
    r = subprocess.run(run + ["train", "--data", str(out), "--steps", "2", "--out", str(tmp_path / "run"),
                              "--layers", "2", "--dim", "32", "--heads", "2", "--seq-len", "32", "--batch-size", "2",
                              "--table-size", "101", "--engram-dim", "16", "--no-progress", "--eval-tokens", "64"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["data"]["prepared"] == str(out)
    ref = str(Path(__file__).parent / "fixtures" / "reference" / "tokenizer-bpe4096")
    r = subprocess.run(run + ["train", "--data", str(out), "--tokenizer", ref, "--steps", "1",
                              "--out", str(tmp_path / "run2"), "--no-progress"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "was prepared with" in r.stderr


def test_a_killed_writers_temporaries_are_removed(corpus, ref_tokenizer):
    _, out = corpus
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    stale = out.parent / f".{out.name}.tmp-{pid}-0123abcd"
    stale.mkdir()
    (stale / "train.tokens").write_bytes(b"\0" * 10)
    live = out.parent / f".{out.name}.tmp-{os.getpid()}-0123abcd"  # this process: still running, kept
    live.mkdir()
    prepared.prepare_corpus([out.parent / "docs.jsonl"], out, ref_tokenizer, overwrite=True, eval_fraction=0.2)
    assert not stale.exists() and live.exists()


def blank_line_reference(text: str) -> list[str]:
    """Documents of the blank-line convention, line by line (the reader does it by regex, in blocks)."""
    docs, cur = [], ""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        full = line + ("\n" if i < len(lines) - 1 else "")
        if not full:
            continue
        if full.strip():
            cur += full
        elif cur:
            docs.append(cur)
            cur = ""
    return docs + ([cur] if cur else [])


@pytest.mark.parametrize("read_bytes", [7, 64, 1 << 22])
def test_blank_line_documents_whatever_the_read_blocks(tmp_path, ref_tokenizer, monkeypatch, read_bytes):
    rng = random.Random(read_bytes)
    pieces = make_docs(40, seed=4)
    seps = ["\n", "\n\n", "  \n\t\n", "\r\n\n", " \n"]
    text = "\n \n" + "".join(p + rng.choice(seps) for p in pieces) + "last line"
    src = tmp_path / "t.txt"
    src.write_text(text)
    monkeypatch.setattr(prepared, "READ_BYTES", read_bytes)
    out = tmp_path / "o"
    prepared.prepare_corpus([src], out, ref_tokenizer, doc_sep="blank-line", eval_fraction=0)
    c = prepared.open_prepared(out, ref_tokenizer)
    want = blank_line_reference(text)
    assert len(want) > 20
    eos = ref_tokenizer.eos_token_id
    assert split_docs(c.splits["train"].tokens, c.splits["train"].doc_offsets) == [
        encode(ref_tokenizer, d) + [eos] for d in want]


def test_doc_index_reads_blocks_of_a_mapped_file(tmp_path, monkeypatch):
    """Lookups through pread of blocks (tiny blocks here) equal a search of the whole array."""
    monkeypatch.setattr(data.DocIndex, "BLOCK", 3)
    rng = np.random.default_rng(0)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 9, 200))]).astype("<i8")
    offsets.tofile(tmp_path / "d.docs")
    mm = np.memmap(tmp_path / "d.docs", dtype="<i8", mode="r")
    index, plain = data.DocIndex(mm), data.DocIndex(offsets)
    assert index._array is None and plain._array is not None  # the file path and the in-memory path
    for lo in rng.integers(0, int(offsets[-1]) + 5, 100).tolist():
        hi = lo + int(rng.integers(1, 40))
        want = offsets[(offsets >= lo) & (offsets < hi)]
        assert np.array_equal(index.between(lo, hi), want) and np.array_equal(plain.between(lo, hi), want)
    index.close()
    # a token file truncated under an open batcher is an error, not short windows
    np.arange(100, dtype="<u2").tofile(tmp_path / "t.tokens")
    toks = np.memmap(tmp_path / "t.tokens", dtype="<u2", mode="r")
    b = data.MemmapBatcher(toks, 4, 8, doc_offsets=np.array([0, 50]))
    assert b.batch_with_boundaries(0)[0].shape == (4, 8)
    with open(tmp_path / "t.tokens", "r+b") as f:
        f.truncate(20)
    with pytest.raises(ValueError, match="shorter than when it was opened"):
        data.read_windows(toks, np.array([50]), 9, fd=b._fd)
    b.close()
