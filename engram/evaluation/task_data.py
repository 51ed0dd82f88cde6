"""Datasets for the lm-eval tasks: the ones shipped in ``engram/evaluation/tasks/`` and local WikiText.

lm-eval task YAMLs name these with ``custom_dataset: !function engram.evaluation.task_data.NAME``;
lm-eval calls them with the task's ``dataset_kwargs`` and its metadata (model arguments among
them) as keyword arguments, so each takes what it needs and ignores the rest. Each returns a
``datasets.DatasetDict`` with one ``test`` split, built in memory: nothing is downloaded or cached.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

#: The task YAMLs and their data (``engram eval`` adds it to lm-eval's include path).
TASKS_DIR = Path(__file__).resolve().parent / "tasks"

#: A WikiText article starts at a top-level heading line, `` = Title = `` (sections are `` = = ... = = ``).
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def _as_one_file(data_files: Any, task: str) -> Path:
    if isinstance(data_files, dict) and set(data_files) == {"test"}:
        data_files = data_files["test"]
    if isinstance(data_files, (list, tuple)) and len(data_files) == 1:
        data_files = data_files[0]
    if not isinstance(data_files, (str, Path)):
        raise ValueError(f"{task}: dataset_kwargs.data_files must name one file (or {{test: FILE}}), got {data_files!r}")
    return Path(data_files)


def _test_split(rows: list[dict[str, Any]]) -> Any:
    import datasets  # noqa: PLC0415 - an lm-eval dependency

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, one per non-blank line (``ValueError`` naming the line if one is not)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n} is not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n} is not a JSON object")
            rows.append(row)
    return rows


def packaged_jsonl(data_files: Any = None, **_: Any) -> Any:
    """A JSON-lines file from the task directory (``data_files`` is relative to it), as the ``test`` split."""
    if data_files is None:
        raise ValueError("packaged_jsonl needs dataset_kwargs.data_files (a file in engram/evaluation/tasks)")
    rel = _as_one_file(data_files, "packaged_jsonl")
    path = (TASKS_DIR / rel).resolve()
    if rel.is_absolute() or TASKS_DIR not in path.parents:
        raise ValueError(f"packaged_jsonl: {str(rel)!r} must be a file name inside {TASKS_DIR}")
    return _test_split(read_jsonl(path))


def wikitext_articles(data_files: Any = None, **_: Any) -> Any:
    """A WikiText file (``wiki.test.tokens`` / ``test.txt``: one paragraph per line, `` = Title = ``
    headings) as one document per article, field ``page``: the layout of
    ``EleutherAI/wikitext_document_level``, which lm-eval's ``wikitext`` task reads. Relative paths
    are from the working directory."""
    if data_files is None:
        raise ValueError("wikitext_articles needs dataset_kwargs.data_files (a WikiText .txt / .tokens file)")
    path = _as_one_file(data_files, "wikitext_articles")
    if not path.is_file():
        raise FileNotFoundError(f"WikiText file {str(path)!r} not found (relative paths are from the working "
                                f"directory, {Path.cwd()})")
    pages: list[list[str]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if _ARTICLE_HEADING.match(line.rstrip("\n")) or not pages:
                pages.append([])
            pages[-1].append(line)
    rows = [{"page": "".join(p)} for p in pages if "".join(p).strip()]
    if not rows:
        raise ValueError(f"WikiText file {str(path)!r} has no text")
    return _test_split(rows)
