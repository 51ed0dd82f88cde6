"""Sizing tool: budgets turn into rows per head that meet them; the CLI reports clean errors."""

from __future__ import annotations

import json

import pytest

from engram import EngramConfig
from engram.cli import main
from engram.core.hashing import head_table_sizes
from engram.training.sizing import plan_tables, projection_params


def cfg(**kw):
    base = dict(hidden_size=64, layer_ids=[0, 2], n_embed_per_ngram=32, n_head_per_ngram=4, engram_vocab_size=[2, 2])
    base.update(kw)
    return EngramConfig(**base)


def test_share_budget_is_met():
    plan = plan_tables(cfg(), base_params=10_000_000, engram_share=0.2)
    assert plan.engram_share == pytest.approx(0.2, abs=1e-3)
    c = EngramConfig.from_dict(plan.config)
    assert c.engram_vocab_size == [plan.rows_per_head] * 2
    # Real prime sizes sit a little above the base (<1% here; less for bigger tables).
    exact = plan_tables(cfg(), base_params=10_000_000, engram_share=0.2, exact_primes=True)
    rows = sum(p for per in head_table_sizes(c).values() for o in per for p in o)
    assert exact.table_params == rows * c.head_dim
    assert 0 <= (exact.table_params - plan.table_params) / plan.table_params < 1e-2


def test_memory_budget_and_dense_count():
    plan = plan_tables(cfg(), memory_bytes=2**24, dtype="bf16")
    assert plan.table_bytes["bf16"] <= 2**24 and plan.table_bytes["bf16"] > 0.99 * 2**24
    c = cfg()
    # value (E*D + D) + keys (E*D + D) + 2 norms (2*D) + conv (D*k) + conv norm (D), per layer
    E, D = c.memory_dim, c.hidden_size
    assert projection_params(c) == 2 * (E * D + D) + 2 * D + D * c.kernel_size + D
    assert plan.projection_params == 2 * projection_params(c)


def test_bad_budgets():
    with pytest.raises(ValueError, match="exactly one"):
        plan_tables(cfg(), table_params=10, memory_bytes=10)
    with pytest.raises(ValueError, match="base_params"):
        plan_tables(cfg(), engram_share=0.2)
    with pytest.raises(ValueError, match="rows per head"):
        plan_tables(cfg(), table_params=10)


def test_cli(capsys):
    assert main(["size", "--base-params", "124M", "--hidden", "768", "--layers", "1,5", "--share", "0.2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["engram_share"] == pytest.approx(0.2, abs=1e-3)
    assert main(["size", "--table-params", "1"]) == 2
    assert "rows per head" in capsys.readouterr().err


def test_table_size_rule_from_training_tokens():
    from engram.training.sizing import MIN_ROWS_PER_HEAD, TOKENS_PER_ROW, rows_per_head_for

    assert rows_per_head_for(0) == MIN_ROWS_PER_HEAD
    n = 1_234_567
    got = rows_per_head_for(n)
    assert abs(got - n / TOKENS_PER_ROW) <= 0.05 * n / TOKENS_PER_ROW  # two significant digits
    assert len(str(got).rstrip("0")) <= 2
    assert rows_per_head_for(2 * n) > got  # more text, bigger table
    with pytest.raises(ValueError):
        rows_per_head_for(-1)


def test_study_without_table_size_uses_and_reports_the_rule(tmp_path, monkeypatch):
    import json
    import random

    from engram.cli import main
    from engram.training.sizing import rows_per_head_for

    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    rng = random.Random(0)
    words = ["the cat", "a dog", "sees", "loves", "the moon", "an apple", "quietly", "the river"]
    (tmp_path / "t.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(5)) for _ in range(500)))
    assert main(["study", "--data", str(tmp_path / "t.txt"), "--steps", "3", "--seeds", "0", "--variants", "engram",
                 "--layers", "2", "--dim", "32", "--heads", "2", "--seq-len", "32", "--batch-size", "4",
                 "--vocab-size", "300", "--engram-dim", "32", "--eval-tokens", "256", "--warmup-steps", "1",
                 "--no-progress", "--out", str(tmp_path / "s")]) == 0
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    chosen = report["data"]["table_size"]
    assert chosen["rows_per_head"] == rows_per_head_for(report["data"]["train_tokens"]) and "tokens" in chosen["rule"]
    sizes = report["runs"][0]["config"]["engram"]["engram_vocab_size"]
    assert sizes == [chosen["rows_per_head"]] * len(sizes)
