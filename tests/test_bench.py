"""``engram bench`` and the runnable example of docs/performance.md."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_engram_bench_quick_writes_json_markdown_and_plots(tmp_path, capsys):
    from engram.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), "--quick", "--reps", "1", "--threads", "1"]) == 0
    r = json.loads((out / "bench.json").read_text())
    assert set(r) >= {"machine", "settings", "seq", "hashing", "lookup", "table", "decode", "plots"}
    assert r["hashing"]["bit_exact"] is True
    assert [row["T"] for row in r["seq"]["rows"]] == r["settings"]["seqs"]
    assert r["seq"]["params"]["engram"]["table"] > 0 and r["seq"]["params"]["base"]["table"] == 0
    assert set(r["table"]["modes"]) == {"sparse", "dense"}
    assert r["decode"]["tok_s"]["engram"] > 0 and r["lookup"]["gb_s"]["memcpy"] > 0
    md = (out / "bench.md").read_text()
    assert "| sparse | 10x |" in md and "Mtok/s" in md
    for f in r["plots"]:
        assert (out / f).read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "--out", str(out), "--only", "hashing,nope"]) == 2
    assert "unknown sections" in capsys.readouterr().err
    assert main(["bench", "--out", str(out), "--only", "decode", "--compile-mode", "reduce-overhead"]) == 2
    assert "--compile-mode needs --compile" in capsys.readouterr().err
    assert r["decode"]["compiled"] is False and r["decode"]["compile_mode"] is None
    assert r["decode"]["fused_projections"] is False
    assert main(["bench", "--out", str(out / "f"), "--only", "decode", "--quick", "--no-rss", "--threads", "1",
                 "--fuse-projections"]) == 0
    fused = json.loads((out / "f" / "bench.json").read_text())["decode"]
    assert fused["fused_projections"] is True and fused["tok_s"]["engram"] > 0
    assert "Engram projections fused" in (out / "f" / "bench.md").read_text()


def test_docs_performance_example_runs():
    import re

    text = (ROOT / "docs" / "performance.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/performance.md[python block {i}]", "exec"), {"__name__": "__docs__"})
