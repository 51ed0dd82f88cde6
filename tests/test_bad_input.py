"""Bad input gets a clear error and loses nothing (issue 13's list grows here)."""

from __future__ import annotations

import pytest
import torch

from engram.nn.memory import MultiHeadEmbedding
from engram.storage.tables import HostMultiHeadEmbedding


@pytest.mark.parametrize("storage", ["memory", "host"])
def test_hash_ids_outside_a_head_are_an_error_not_the_neighbours_rows(storage):
    """Row sizes[0] of head 0 is row 0 of head 1 in the flat table; -1 of head 1 is head 0's last
    row. Both used to be read silently."""
    sizes = [5, 7]
    mem = MultiHeadEmbedding(sizes, 3) if storage == "memory" else HostMultiHeadEmbedding(sizes, 3)
    ok = torch.tensor([[[4, 6], [0, 0]]])
    assert mem(ok).shape == (1, 2, 2, 3)
    with pytest.raises(ValueError, match=r"head 0 must be in \[0, 5\)"):
        mem(torch.tensor([[[5, 0]]]))
    with pytest.raises(ValueError, match=r"head 1 must be in \[0, 7\)"):
        mem(torch.tensor([[[0, -1]]]))


def test_generate_and_forward_arguments_are_checked():
    from helpers import tiny_gpt

    m = tiny_gpt(False).eval()
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="prompt"):
        m.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="top_k"):
        m.generate(prompt, 3, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(prompt, 3, temperature=float("nan"))
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(prompt, -1)
    with pytest.raises(ValueError, match="at least one token"):
        m(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.long))
    with torch.no_grad():  # any integer dtype is accepted, with the same result
        assert torch.equal(m(prompt.to(torch.uint8))[0], m(prompt)[0])
        assert torch.equal(m(prompt.int())[0], m(prompt)[0])
    with pytest.raises(TypeError, match="integer"):
        m(prompt.float())


@pytest.mark.parametrize("kw,match", [
    ({"layer_ids": []}, "layer_ids is empty"),
    ({"seed": -1}, "seed"),
    ({"engram_vocab_size": [100.7, 200]}, "must be an integer"),
    ({"engram_vocab_size": [10**19, 10**19]}, "too large"),
    ({"lite": True, "lite_scale_init": float("nan")}, "lite_scale_init"),
])
def test_config_values_are_checked(kw, match):
    from engram import EngramConfig

    base = dict(hidden_size=32, layer_ids=[0], engram_vocab_size=[101, 103])
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        EngramConfig(**base)
    assert EngramConfig(hidden_size=32, layer_ids=[0], engram_vocab_size=[101.0, 103.0]).engram_vocab_size == [101, 103]


def test_gpt_config_values_are_checked():
    from engram import GPTConfig

    with pytest.raises(ValueError, match="mlp_ratio"):
        GPTConfig(vocab_size=97, n_layer=1, n_head=2, n_embd=32, mlp_ratio=-1)


def test_hidden_states_of_another_dtype_are_a_clear_error():
    from helpers import tiny_gpt

    eng = tiny_gpt(False).engram_layers()[0]
    ids = torch.zeros(1, 2, 8, dtype=torch.long)
    with pytest.raises(TypeError, match="float16 but the Engram weights are torch.float32"):
        eng(torch.randn(1, 2, 32).half(), ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision is fine
        assert torch.isfinite(eng(torch.randn(1, 2, 32).bfloat16(), ids)).all()


def test_tables_larger_than_ram_fail_before_the_allocator():
    with pytest.raises(ValueError, match="GiB of RAM.*offload"):
        MultiHeadEmbedding([10**12, 10**12], 64)
    meta = MultiHeadEmbedding([10**12, 10**12], 64, device="meta")  # planned, never allocated: fine
    assert meta.num_rows == 2 * 10**12


def test_cli_numbers_are_checked_by_argparse(capsys):
    from engram.cli import main

    for flags, what in ((["--threads", "-1"], "--threads"), (["--grad-clip", "nan"], "--grad-clip"),
                        (["--lr", "0"], "--lr"), (["--steps", "0"], "--steps"), (["--seed", "-3"], "--seed")):
        with pytest.raises(SystemExit) as e:
            main(["train", "--out", "unused", *flags])
        assert e.value.code == 2
        assert what in capsys.readouterr().err


def test_training_config_rejects_non_finite_numbers():
    from engram.training.loop import TrainConfig

    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=float("nan"))
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=float("inf"))


def test_inspect_heatmap_path_is_the_file_written(tmp_path):
    from engram.cli.inspect import heatmap_path

    assert heatmap_path(tmp_path) == tmp_path / "engram-inspect.png"
    assert heatmap_path(tmp_path / "gates") == tmp_path / "gates.png"
    assert heatmap_path(tmp_path / "g.png") == tmp_path / "g.png"
    with pytest.raises(ValueError, match="does not exist"):
        heatmap_path(tmp_path / "no" / "g.png")


def test_output_directory_is_checked_and_locked_before_training(tmp_path, capsys):
    from engram.cli import main
    from engram.training.checkpoint import RunLock

    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, msg in ((afile, "is a file"), (afile / "sub", "is a file")):
        assert main(["train", "--out", str(out), "--steps", "1"]) == 2
        assert msg in capsys.readouterr().err
    busy = tmp_path / "busy"
    with RunLock(busy):  # another run holds it: the second fails at once, naming the holder
        assert main(["train", "--out", str(busy), "--steps", "1"]) == 2
        assert "in use by another engram run" in capsys.readouterr().err
        assert main(["study", "--out", str(busy), "--steps", "1"]) == 2
    with RunLock(busy):  # released when the holder ends
        pass
    assert not busy.exists()  # created for runs that wrote nothing: removed again


def test_resume_writes_only_under_its_own_directory(tmp_path, capsys):
    from engram.cli import main

    assert main(["train", "--resume", str(tmp_path / "run"), "--out", str(tmp_path / "elsewhere")]) == 2
    assert "drop --out" in capsys.readouterr().err
