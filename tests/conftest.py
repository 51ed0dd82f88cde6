"""Shared fixtures: the reference tokenizer and hash vectors (tests/fixtures/reference, see its README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference"


@pytest.fixture(scope="session")
def ref_tokenizer():
    path = REFERENCE / "tokenizer-bpe4096"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def ref_vectors():
    path = REFERENCE / "hash_vectors.json"
    return json.loads(path.read_text())["cases"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread avoids spin-wait contention (10x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Every test caches tokenizers, token arrays and kernels under the session's temporary
    directory, never in the user's ~/.cache."""
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "engram-cache"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small generated corpus on disk (tests/helpers.py ``make_text``)."""
    from helpers import make_text

    p = tmp_path_factory.mktemp("data") / "text.txt"
    p.write_text(make_text())
    return p


@pytest.fixture
def terminal_sigint():
    """SIGINT handled as in a terminal (Python's KeyboardInterrupt), even where the test process
    was started with it ignored (a background job, as CI runs): tests that press Ctrl-C need it."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
