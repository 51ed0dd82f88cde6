"""Every ```python block of README.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert BLOCKS, "README.md has no python example"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})


def test_files_the_docs_point_to_exist():
    """Every docs/*.md or benchmarks/* path named in README.md and docs/*.md is in the repository."""
    root = README.parent
    texts = [README, *sorted((root / "docs").glob("*.md"))]
    named = {m for t in texts for m in re.findall(r"(?<![\w/.])((?:docs|benchmarks)/[\w./-]+\.(?:md|py|sh))", t.read_text())}
    assert named, "no docs/ or benchmarks/ paths found"
    missing = sorted(p for p in named if not (root / p).exists())
    assert not missing, f"named but missing: {missing}"
