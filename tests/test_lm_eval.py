"""lm-evaluation-harness: the ``engram`` lm-eval model, ``engram eval``, the shipped tasks.

Every number lm-eval reports is recomputed here from the model's own logits, without lm-eval:
a continuation's log-likelihood as the sum of its tokens' log-softmax, a text's rolling
log-likelihood as the strided sum of the transformers perplexity guide (stride = context length),
accuracy as the argmax over the choices. lm-eval is a dev dependency: these tests fail, not skip,
without it. Nothing reaches the network (``HF_*_OFFLINE``, every dataset is built in memory).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from engram.cli import main

from helpers import TINY  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "engram" / "evaluation" / "tasks"
WIKITEXT_YAML = ROOT / "docs" / "eval_tasks" / "wikitext2_local.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "hf-home"
    for k, v in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache),
                 "HF_DATASETS_CACHE": str(cache / "datasets"), "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text_file):
    """A tiny ``engram train`` run (block_size 32, so the shipped paragraphs need several windows)."""
    out = tmp_path_factory.mktemp("lmeval") / "run"
    assert main(["train", "--data", str(text_file), "--steps", "12", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def ck(run_dir):
    from engram.training.checkpoint import load_checkpoint

    c = load_checkpoint(run_dir)
    c.model.eval()
    return c


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------- the independent computation
def gpt_logits(model):
    def f(ids: list[int]) -> torch.Tensor:  # (L,) -> (L, V)
        with torch.no_grad():
            return model(torch.tensor([ids]))[0][0].float()
    return f


def hf_logits(model):
    def f(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float()
    return f


def continuation_ll(logits_fn, ctx: list[int], cont: list[int], block: int) -> tuple[float, bool]:
    """log p(cont | ctx) and whether greedy decoding gives cont: one forward of ctx + cont[:-1],
    cut on the left to the model's `block` ids."""
    ctx = (ctx + cont)[-(block + 1):][:-len(cont)]
    logp = F.log_softmax(logits_fn(ctx + cont[:-1]), -1)[len(ctx) - 1:]  # (n, V): predicting cont
    t = torch.tensor(cont)
    return float(logp[torch.arange(len(cont)), t].sum()), bool((logp.argmax(-1) == t).all())


def strided_ll(logits_fn, tokens: list[int], prefix: int, block: int) -> float:
    """sum_i log p(tokens[i] | the preceding ids of its chunk), chunks of `block` predictions; each
    forward sees at most `block` ids, the last chunk the `block` ids before its end
    (huggingface.co/docs/transformers/perplexity with stride = max_length = block)."""
    seq = [prefix] + tokens  # seq[j] is the input that predicts tokens[j]
    total = 0.0
    for start in range(0, len(tokens), block):
        end = min(start + block, len(tokens))
        lo = max(0, end - block)
        logp = F.log_softmax(logits_fn(seq[lo:end]), -1)  # (end - lo, V)
        total += sum(float(logp[j - lo, tokens[j]]) for j in range(start, end))
    return total


def split_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a causal pair: the context's trailing spaces move to the continuation, then
    context + continuation is encoded whole and the context's ids come first."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False)
    n = len(tok.encode(context, add_special_tokens=False))
    return whole[:n], whole[n:]


def expected_ppl(texts: list[str], lls: list[float]) -> dict[str, float]:
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    ll = sum(lls)
    return {"word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / nbytes),
            "bits_per_byte": -ll / nbytes / math.log(2)}


def expected_mc(logits_fn, tok, items: list[dict], block: int) -> tuple[list[list[float]], float, float]:
    lls, acc, acc_norm = [], 0, 0
    for it in items:
        row = []
        for choice in it["choices"]:
            ctx, cont = split_pair(tok, it["context"], " " + choice)  # lm-eval's target_delimiter " "
            row.append(continuation_ll(logits_fn, ctx, cont, block)[0])
        lls.append(row)
        acc += max(range(len(row)), key=row.__getitem__) == it["label"]
        acc_norm += max(range(len(row)), key=lambda i: row[i] / len(it["choices"][i])) == it["label"]
    return lls, acc / len(items), acc_norm / len(items)


def instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


# ---------------------------------------------------------------------- fast: the model class itself
def test_engram_lm_scores_equal_the_model_computed_directly(run_dir, ck):
    from engram.evaluation.harness import EngramLM

    model, tok = ck.model, ck.tokenizer
    block, eot = model.config.block_size, tok.eos_token_id
    f = gpt_logits(model)
    lms = [EngramLM(str(run_dir), device="cpu", batch_size=b) for b in (1, 3)]
    pairs = [("the cat sees", " a dog."), ("my friend loves the moon", " and the river."), ("a", " dog"),
             ("the king finds an apple. " * 6, "the moon sees the king. " * 3)]  # > block: truncated left
    for lm in lms:
        got = lm.loglikelihood(instances("loglikelihood", pairs))
        for (c, x), (ll, greedy) in zip(pairs, got):
            want = continuation_ll(f, *split_pair(tok, c, x), block)
            assert ll == pytest.approx(want[0], rel=1e-5, abs=1e-4) and greedy == want[1]
    # rolling: a short text (one window) and one of several windows, with the model's own strided sum
    texts = ["the cat sees a dog.", " ".join(["the king loves the river. my friend finds an apple."] * 8)]
    assert len(tok.encode(texts[1])) > 3 * block
    for lm in lms:
        got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]))
        want = [strided_ll(f, tok.encode(t), eot, block) for t in texts]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-4)
    # one text: a single forward with targets gives the same sum (the loss is the mean NLL)
    ids = [eot] + tok.encode(texts[0])
    with torch.no_grad():
        _, loss = model(torch.tensor([ids[:-1]]), targets=torch.tensor([ids[1:]]))
    assert got[0] == pytest.approx(-float(loss) * (len(ids) - 1), rel=1e-5)


def test_engram_lm_greedy_generation_equals_argmax_decoding(run_dir, ck):
    from engram.evaluation.harness import EngramLM

    model, tok = ck.model, ck.tokenizer
    lm = EngramLM(str(run_dir), device="cpu")
    prompts = ["the cat", "my friend loves"]
    got = lm.generate_until(instances("generate_until", [(p, {"until": ["moon"], "max_gen_toks": 12}) for p in prompts]))
    for p, text in zip(prompts, got):
        ids = tok.encode(p)
        new = []
        for _ in range(12):  # full forward each step: no KV cache
            nxt = int(gpt_logits(model)(ids + new)[-1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
        assert text == tok.decode(new).split("moon")[0]


def test_engram_lm_bad_arguments_are_clear_errors(run_dir, tmp_path):
    from engram.evaluation.harness import EngramLM, checkpoint_kind
    from lm_eval.api.registry import get_model

    assert get_model("engram") is EngramLM
    with pytest.raises(ValueError, match="auto"):
        EngramLM(str(run_dir), batch_size="auto")
    with pytest.raises(ValueError, match="batch_size"):
        EngramLM(str(run_dir), batch_size="0")
    with pytest.raises(ValueError, match="unknown model_args.*pretrained"):
        EngramLM(str(run_dir), pretrained="gpt2")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
        checkpoint_kind(tmp_path / "empty")
    assert checkpoint_kind(run_dir) == "engram"
    lm = EngramLM(str(run_dir), batch_size="2", verify="false")
    with pytest.raises(ValueError, match="does not fit"):
        lm.loglikelihood(instances("loglikelihood", [("a", " dog" * 40)]))
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until(instances("generate_until", [("a", {"do_sample": True, "temperature": 1.0})]))


def test_engram_eval_without_lm_eval_says_how_to_install(run_dir, monkeypatch, capsys):
    import engram.evaluation

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    monkeypatch.delitem(sys.modules, "engram.evaluation.harness", raising=False)
    monkeypatch.delattr(engram.evaluation, "harness", raising=False)
    assert main(["eval", "--checkpoint", str(run_dir), "--tasks", "engram_ppl"]) == 2
    assert "pip install 'engram-torch[eval]'" in capsys.readouterr().err


def test_wikitext_articles_and_packaged_data(tmp_path):
    from engram.evaluation.task_data import packaged_jsonl, wikitext_articles

    wiki = " \n = First = \n \n Para one . \n \n = = Section = = \n \n Para two . \n \n = Second = \n \n Three . \n"
    (tmp_path / "w.txt").write_text(wiki)
    pages = wikitext_articles(data_files=str(tmp_path / "w.txt"), checkpoint="ignored")["test"]["page"]
    assert pages == [" = First = \n \n Para one . \n \n = = Section = = \n \n Para two . \n \n",
                     " = Second = \n \n Three . \n"]
    assert packaged_jsonl(data_files={"test": "engram_mc.jsonl"})["test"].to_list() == read_jsonl(TASKS / "engram_mc.jsonl")
    with pytest.raises(ValueError, match="inside"):
        packaged_jsonl(data_files="../task_data.py")
    with pytest.raises(FileNotFoundError, match="working directory"):
        wikitext_articles(data_files=str(tmp_path / "missing.txt"))


def test_extras_and_package_data_ship_lm_eval_and_the_tasks():
    text = (ROOT / "pyproject.toml").read_text()
    extras = re.search(r"^\[project\.optional-dependencies\]\n(.*?)^\[", text, re.M | re.S).group(1)
    assert re.search(r'^eval = \["lm-eval>=', extras, re.M)
    assert re.search(r'^dev = \[.*"lm-eval>=', extras, re.M)  # CI installs .[dev]: these tests run there
    globs = re.findall(r'"([^"]+)"', re.search(r"^\[tool\.setuptools\.package-data\]\s*\nengram\s*=\s*\[(.*?)\]",
                                               text, re.M | re.S).group(1))
    shipped = {p for g in globs for p in (ROOT / "engram").glob(g)}
    assert {p for p in TASKS.iterdir() if p.suffix in (".yaml", ".jsonl")} <= shipped
    assert len(shipped & set(TASKS.iterdir())) == 4


# ---------------------------------------------------------------------- engram eval, end to end
def test_engram_eval_end_to_end_equals_the_model_computed_directly(run_dir, ck, tmp_path, capsys):
    model, tok = ck.model, ck.tokenizer
    out = tmp_path / "res.json"
    assert main(["eval", "--checkpoint", str(run_dir), "--tasks", "engram_ppl,engram_mc", "--batch-size", "4",
                 "--device", "cpu", "--out", str(out), "--log-samples"]) == 0
    table = capsys.readouterr().out
    assert "engram_ppl" in table and "word_perplexity" in table and "acc" in table
    res = json.loads(out.read_text())
    f = gpt_logits(model)
    docs = read_jsonl(TASKS / "engram_ppl.jsonl")
    texts = [d["text"] for d in docs]
    lls = [strided_ll(f, tok.encode(t), tok.eos_token_id, model.config.block_size) for t in texts]
    for k, v in expected_ppl(texts, lls).items():
        assert res["results"]["engram_ppl"][f"{k},none"] == pytest.approx(v, rel=1e-5)
    items = read_jsonl(TASKS / "engram_mc.jsonl")
    lls, acc, acc_norm = expected_mc(f, tok, items, model.config.block_size)
    got = {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in res["samples"]["engram_mc"]}
    torch.testing.assert_close(torch.tensor([got[i] for i in range(len(items))]), torch.tensor(lls),
                               rtol=1e-5, atol=1e-4)
    assert res["results"]["engram_mc"]["acc,none"] == pytest.approx(acc)
    assert res["results"]["engram_mc"]["acc_norm,none"] == pytest.approx(acc_norm)
    # --limit, and the WikiText task of docs/eval.md on a small WikiText-format file
    wiki = " = Cats = \n \n The cat sat on the mat . \n \n = Dogs = \n \n A dog sees the moon @-@ light . \n"
    (tmp_path / "wiki.txt").write_text(wiki)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    yaml = WIKITEXT_YAML.read_text()
    assert "../shared/data/wikitext-2/test.txt" in yaml
    (tasks / "w.yaml").write_text(yaml.replace("../shared/data/wikitext-2/test.txt", str(tmp_path / "wiki.txt")))
    assert main(["eval", "--checkpoint", str(run_dir), "--tasks", "wikitext2_local,engram_mc", "--limit", "2",
                 "--include-path", str(tasks), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n-samples"]["engram_mc"]["effective"] == 2
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    pages = [" = Cats = \n \n The cat sat on the mat . \n \n", " = Dogs = \n \n A dog sees the moon @-@ light . \n"]
    lls = [strided_ll(f, tok.encode(wikitext_detokenizer({"page": p})), tok.eos_token_id, model.config.block_size)
           for p in pages]
    for k, v in expected_ppl(pages, lls).items():  # lm-eval's wikitext counts words and bytes of the raw page
        assert res["results"]["wikitext2_local"][f"{k},none"] == pytest.approx(v, rel=1e-5)


@pytest.mark.slow
def test_saved_engram_for_causal_lm_through_lm_evals_hf_model(ref_tokenizer, tmp_path, run_dir):
    """A save_pretrained EngramForCausalLM: `engram eval` (lm-eval's HFLM) and `python -m
    engram.evaluation` (lm-eval's command line with Engram imported) score it like its own forward."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from engram import EngramConfig
    from engram.hf import EngramForCausalLM

    tok = ref_tokenizer
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2,
                                                       n_positions=48, bos_token_id=tok.eos_token_id,
                                                       eos_token_id=tok.eos_token_id))
    model = EngramForCausalLM.from_base(base, EngramConfig(hidden_size=32, layer_ids=[1], n_embed_per_ngram=16,
                                                           n_head_per_ngram=2, engram_vocab_size=[1009, 1009]), tok)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero branch (it starts at exactly zero)
        for name, p in model.engram.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "memory" in name else 0.3) + (1.0 if "norm" in name else 0.0))
    model.eval().save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    out = tmp_path / "res.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "hf"), "--tasks", "engram_ppl", "--batch-size", "3",
                 "--out", str(out)]) == 0
    texts = [d["text"] for d in read_jsonl(TASKS / "engram_ppl.jsonl")]
    f = hf_logits(model)
    lls = [strided_ll(f, tok.encode(t), tok.eos_token_id, 48) for t in texts]
    assert max(len(tok.encode(t)) for t in texts) > 48  # several windows
    want = expected_ppl(texts, lls)
    got = json.loads(out.read_text())["results"]["engram_ppl"]
    for k, v in want.items():
        assert got[f"{k},none"] == pytest.approx(v, rel=1e-5)
    # lm-eval's own command line, through python -m engram.evaluation: model hf, and model engram
    res = subprocess.run([sys.executable, "-m", "engram.evaluation", "run", "--model", "hf", "--model_args",
                          f"pretrained={tmp_path / 'hf'}", "--device", "cpu", "--tasks", "engram_ppl", "--include_path",
                          str(TASKS), "--output_path", str(tmp_path / "cli")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    [written] = list((tmp_path / "cli").rglob("results_*.json"))
    assert json.loads(written.read_text())["results"]["engram_ppl"]["word_perplexity,none"] == \
        pytest.approx(want["word_perplexity"], rel=1e-5)
    res = subprocess.run([sys.executable, "-m", "engram.evaluation", "run", "--model", "engram", "--model_args",
                          f"checkpoint={run_dir}", "--tasks", "engram_mc", "--include_path", str(TASKS), "--limit", "3"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "engram_mc" in res.stdout and "acc" in res.stdout
