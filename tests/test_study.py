"""``engram study``: variants, verdict arithmetic, outputs, bad input, and the docs example."""

from __future__ import annotations

import json
import math
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from engram.cli import main
from engram.cli.study import VARIANTS, interp, interval, parse_variants, verdict

DOCS = Path(__file__).resolve().parents[1] / "docs" / "study.md"
TINY = ["--layers", "2", "--dim", "32", "--heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--table-size", "101", "--vocab-size", "300", "--engram-dim", "32", "--eval-tokens", "256",
        "--warmup-steps", "2", "--eval-points", "2", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    words = ["the cat", "a dog", "sees", "loves", "the moon", "an apple", "quietly", "the river"]
    p = tmp_path_factory.mktemp("data") / "text.txt"
    p.write_text("\n".join(" ".join(rng.choice(words) for _ in range(5)) for _ in range(500)) + "\n")
    return p


def test_parse_variants():
    assert parse_variants("baseline, engram,lite") == ["baseline", "engram", "lite"]
    with pytest.raises(ValueError, match="unknown variant.*bogus.*valid variants: baseline, engram, lite, noconv, nogate"):
        parse_variants("baseline,bogus")
    with pytest.raises(ValueError, match="distinct"):
        parse_variants("engram,engram")


def test_variants_map_to_config_switches():
    from engram import EngramConfig

    e = EngramConfig(hidden_size=32, layer_ids=[1], n_embed_per_ngram=32, n_head_per_ngram=2, engram_vocab_size=[11, 11])
    assert VARIANTS["baseline"](e) is None and VARIANTS["engram"](e) == e
    assert VARIANTS["lite"](e).lite and not VARIANTS["noconv"](e).use_short_conv and not VARIANTS["nogate"](e).use_gate


def test_verdict_interpolates_equal_steps_and_seconds():
    base = {"name": "baseline", "step_seconds_median": 1.0, "tokens_per_second": 100.0,
            "curve": [{"step": 0, "seconds": 0.0, "val_loss": 8.0}, {"step": 10, "seconds": 10.0, "val_loss": 4.0}]}
    eng = {"name": "engram", "step_seconds_median": 2.0, "tokens_per_second": 50.0,
           "curve": [{"step": 0, "seconds": 0.0, "val_loss": 8.0}, {"step": 5, "seconds": 10.0, "val_loss": 5.0}]}
    v = verdict([base, eng])["comparisons"][0]
    # Equal steps: step 5 -> baseline interpolates to 6.0, engram is at 5.0 (ahead by 1).
    assert v["equal_steps"]["step"] == 5 and v["equal_steps"]["reference_loss"] == pytest.approx(6.0)
    assert v["equal_steps"]["gap"] == pytest.approx(-1.0) and v["ahead_at_equal_steps"]
    # Equal seconds: 10 s -> baseline 4.0, engram 5.0 (behind by 1).
    assert v["equal_seconds"]["gap"] == pytest.approx(1.0) and not v["ahead_at_equal_seconds"]
    assert v["step_time_overhead"] == pytest.approx(1.0) and v["tokens_per_second_ratio"] == pytest.approx(0.5)
    assert interp(base["curve"], "seconds", 2.5) == pytest.approx(7.0)
    # Measured timing, when given, decides the overhead.
    timing = {"baseline": {"median": 1.0}, "engram": {"median": 1.25}}
    assert verdict([base, eng], timing=timing)["comparisons"][0]["step_time_overhead"] == pytest.approx(0.25)


def test_verdict_over_seeds_gives_a_95_percent_interval_and_says_tied_when_it_holds_zero():
    def run(name, seed, final):
        return {"name": name, "seed": seed, "step_seconds_median": 1.0, "tokens_per_second": 1.0,
                "curve": [{"step": 0, "seconds": 0.0, "val_loss": 8.0}, {"step": 10, "seconds": 10.0, "val_loss": final}]}

    gaps = [-0.10, -0.12, -0.08]
    runs = [r for i, g in enumerate(gaps) for r in (run("baseline", i, 4.0), run("engram", i, 4.0 + g))]
    c = verdict(runs)["comparisons"][0]
    mean, sd = sum(gaps) / 3, statistics.stdev(gaps)
    assert c["seeds"] == [0, 1, 2] and c["equal_steps"]["gaps"] == pytest.approx(gaps)
    assert c["equal_steps"]["gap"] == pytest.approx(mean)
    assert c["equal_steps"]["high"] == pytest.approx(mean + 4.303 * sd / math.sqrt(3))  # t(0.975, df=2)
    assert c["equal_steps"]["verdict"] == "ahead"
    gaps = [-0.10, 0.05, -0.02]  # an interval across 0
    runs = [r for i, g in enumerate(gaps) for r in (run("baseline", i, 4.0), run("engram", i, 4.0 + g))]
    c = verdict(runs)["comparisons"][0]
    assert c["equal_seconds"]["low"] < 0 < c["equal_seconds"]["high"] and c["equal_seconds"]["verdict"] == "tied"
    assert interval([0.3]) == (0.3, 0.3, 0.3)


def test_study_writes_report_summary_and_plots(tmp_path, text_file, capsys):
    out = tmp_path / "study"
    rc = main(["study", "--data", str(text_file), "--steps", "4", "--variants", "baseline,engram,nogate",
               "--seeds", "0,1", "--timing-rounds", "3", "--out", str(out), *TINY])
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "engram vs baseline (2 seeds)" in printed and "per wall-clock second" in printed
    assert "95% interval" in printed and "negative = the variant is better" in printed
    assert "inside the learning-rate warmup" not in captured.err  # 4 steps > 2 warmup steps
    report = json.loads((out / "report.json").read_text())
    assert [(r["name"], r["seed"]) for r in report["runs"]] == [
        ("baseline", 0), ("engram", 0), ("nogate", 0), ("baseline", 1), ("engram", 1), ("nogate", 1)]
    keys = {"name", "seed", "config", "params_dense", "params_table", "steps", "tokens", "wall_seconds",
            "tokens_per_second", "step_seconds_median", "final_val_loss", "curve", "passes"}
    timing = report["timing"]
    assert set(timing) == {"baseline", "engram", "nogate"} and all(t["n"] == 3 for t in timing.values())
    for r in report["runs"]:
        assert keys <= set(r)
        assert r["steps"] == 4 and r["tokens"] == 4 * 4 * 32  # same budget, same stream
        assert r["curve"][0]["step"] == 0 and r["curve"][-1]["step"] == 4
        assert all(set(c) == {"step", "seconds", "clock_seconds", "tokens", "val_loss"} for c in r["curve"])
        # equal seconds = steps x the measured seconds per step
        assert all(c["seconds"] == pytest.approx(c["step"] * timing[r["name"]]["median"]) for c in r["curve"])
        assert r["final_val_loss"] == r["curve"][-1]["val_loss"]
        assert r["passes"] == pytest.approx(r["tokens"] / report["data"]["train_tokens"])
        assert r["rss_delta_mb"] >= 0 and r["state_mb"] > 0
    by = {(r["name"], r["seed"]): r for r in report["runs"]}
    assert by["baseline", 0]["params_table"] == 0 and by["engram", 0]["params_table"] > 0
    # One dense initialisation per seed, and a zero-initialised value projection: at step 0 the
    # Engram model is exactly the baseline.
    for seed in (0, 1):
        assert by["baseline", seed]["curve"][0]["val_loss"] == by["engram", seed]["curve"][0]["val_loss"]
    assert by["engram", 0]["curve"] != by["engram", 1]["curve"]  # another seed, another run
    assert {c["variant"] for c in report["verdict"]["comparisons"]} == {"engram", "nogate"}
    assert report["machine"]["torch_threads"] == 1 and len(report["machine"]["load_before"]) == 3
    for f in ("summary.md", "loss_vs_steps.png", "loss_vs_seconds.png", "gap_vs_seconds.png"):
        assert (out / f).stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "## Verdict" in summary and "## Timing" in summary


def test_study_curves_do_not_depend_on_machine_load(tmp_path, text_file):
    """A step budget makes the loss-vs-step curves a pure function of (seed, step): the same
    study beside two busy processes gives bit-identical curves."""
    args = ["study", "--data", str(text_file), "--steps", "4", "--seeds", "3", "--timing-rounds", "2", *TINY]
    assert main([*args, "--out", str(tmp_path / "quiet")]) == 0
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        assert main([*args, "--out", str(tmp_path / "busy")]) == 0
    finally:
        for p in busy:
            p.kill()
    quiet, loaded = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("quiet", "busy"))
    assert [[(c["step"], c["val_loss"]) for c in r["curve"]] for r in quiet["runs"]] == \
        [[(c["step"], c["val_loss"]) for c in r["curve"]] for r in loaded["runs"]]
    assert quiet["verdict"]["comparisons"][0]["equal_steps"]["gap"] == \
        loaded["verdict"]["comparisons"][0]["equal_steps"]["gap"]


def test_study_warns_inside_warmup_and_beyond_one_pass(tmp_path, text_file, capsys):
    assert main(["study", "--data", str(text_file), "--steps", "4", "--seeds", "0", "--timing-rounds", "1",
                 "--out", str(tmp_path / "w"), *TINY, "--warmup-steps", "5", "--batch-size", "64"]) == 0
    err = capsys.readouterr().err
    assert "inside the learning-rate warmup" in err
    report = json.loads((tmp_path / "w" / "report.json").read_text())
    assert any("inside the learning-rate warmup" in w for w in report["warnings"])
    passes = report["runs"][0]["passes"]
    assert passes > 1 and f"saw their training text {passes:.1f} times" in err


def test_study_bad_input_writes_nothing(tmp_path, text_file, capsys):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "report.json").write_text('{"good": true}')
    assert main(["study", "--data", str(tmp_path / "missing.txt"), "--out", str(out), *TINY]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["study", "--data", str(text_file), "--variants", "baseline,turbo", "--out", str(out), *TINY]) == 2
    assert "valid variants" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["study", "--data", str(empty), "--out", str(out), *TINY]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["study", "--data", str(text_file), "--seq-len", "4096", "--out", str(out), *TINY[:6], *TINY[8:]]) == 2
    assert "too short" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text()) == {"good": True}
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


def test_docs_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert blocks, "docs/study.md needs a ```python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(DOCS), "exec"), {"__name__": "__docs__"})


def test_variant_overrides_and_sweep_variants():
    from engram.cli.study import split_variant
    from engram.cli.sweep import sweep_variants

    assert split_variant("engram@table-size=5000:engram-layers=0+2") == ("engram", {"table_size": 5000,
                                                                                  "engram_layers": "0,2"})
    with pytest.raises(ValueError, match="FLAG=VALUE"):
        split_variant("engram@lr=3")
    with pytest.raises(ValueError, match="needs an integer"):
        split_variant("engram@table-size=big")
    assert sweep_variants("table-size", ["100", "400"]) == ["baseline", "engram@table-size=100", "engram@table-size=400"]
    assert sweep_variants("variant", ["engram", "lite"]) == ["baseline", "engram", "lite"]
    with pytest.raises(ValueError, match="unknown variant"):
        sweep_variants("variant", ["turbo"])


def test_allocation_sweep_keeps_the_total_and_gives_tables_the_share(tmp_path, text_file):
    """The paper's U-curve axis: at a fixed total (the baseline's parameters), share s goes to the
    tables and the dense model narrows to fit; the runs' real counts say so."""
    import argparse

    from engram.cli import sweep

    p = argparse.ArgumentParser()
    sweep.add_arguments(p)
    args = p.parse_args(["--axis", "allocation", "--values", "0.2", *TINY])
    plans = [sweep.allocation_variant(args, s, 300)[1] for s in (0.1, 0.3, 0.6)]
    assert [q["dim"] for q in plans] == sorted((q["dim"] for q in plans), reverse=True)  # more tables, narrower
    for q in plans:  # the width grid (multiples of 2 x heads) decides how near the share can get
        assert q["table_share"] == pytest.approx(q["share"], abs=0.12)
        assert q["dense_params"] + q["table_params"] == pytest.approx(q["total_params"], rel=0.02)
    with pytest.raises(ValueError, match="share in"):
        sweep.allocation_variant(args, 1.2, 300)
    out = tmp_path / "alloc"
    assert main(["sweep", "--axis", "allocation", "--values", "0.3", "--data", str(text_file), "--steps", "2",
                 "--seeds", "0", "--timing-rounds", "1", "--out", str(out), *TINY]) == 0
    report = json.loads((out / "report.json").read_text())
    base, alloc = report["runs"][0], report["runs"][1]
    total = base["params_dense"]
    assert base["params_table"] == 0
    # each head's table is the next prime above the planned rows: a few % more at this tiny size
    assert alloc["params_dense"] + alloc["params_table"] == pytest.approx(total, rel=0.06)
    plan = sweep.allocation_variant(args, 0.3, 300)[1]
    assert alloc["params_table"] / total == pytest.approx(plan["table_share"], abs=0.06)  # primes, tiny tables
    assert json.loads((out / "sweep.json").read_text())["rows"][0]["value"] == "0.3"


def test_sweep_over_table_size_writes_its_table_and_plot(tmp_path, text_file, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--axis", "table-size", "--values", "50,200", "--data", str(text_file), "--steps", "4",
                 "--seeds", "0,1", "--timing-rounds", "2", "--out", str(out), *TINY]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["value"] for r in sweep["rows"]] == ["50", "200"]
    small, large = sweep["rows"]
    assert small["params_table"] < large["params_table"]  # the override reached the model
    assert all(r["low_steps"] <= r["gap_steps"] <= r["high_steps"] for r in sweep["rows"])
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["runs"]][:3] == ["baseline", "engram@table-size=50", "engram@table-size=200"]
    assert (out / "sweep.png").stat().st_size > 0 and "| 200 |" in (out / "sweep.md").read_text()
