"""Shared fixtures: the reference tokenizer and vectors from ../shared (skipped cleanly when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
