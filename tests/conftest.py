"""Shared fixtures: the reference tokenizer and vectors from ../shared (skipped cleanly when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def ref_tokenizer():
    path = REFERENCE / "tokenizer-bpe4096"
    if not path.exists():
        pytest.skip("../shared/reference is not present")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def ref_vectors():
    path = REFERENCE / "hash_vectors.json"
    if not path.exists():
        pytest.skip("../shared/reference is not present")
    return json.loads(path.read_text())["cases"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread avoids spin-wait contention (10x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
