"""lm-evaluation-harness (``lm-eval`` 0.4) for Engram models.

* ``EngramLM``, registered with lm-eval as model ``engram``: a checkpoint written by ``engram train``
  (an ``EngramGPT`` and its tokenizer; a run directory means its latest checkpoint), loaded with
  :func:`engram.training.checkpoint.load_checkpoint`.
* A saved :class:`~engram.hf.EngramForCausalLM` (``save_pretrained`` directory with its tokenizer)
  needs nothing new: lm-eval's own ``hf`` model (``HFLM``) loads it through
  ``AutoModelForCausalLM`` once ``engram.hf`` is imported. :func:`make_lm` picks the one a
  directory needs; :func:`evaluate` runs ``lm_eval.simple_evaluate`` with Engram's tasks
  (``engram/evaluation/tasks``) on the include path.

Scoring (``EngramLM``), for a context ``c`` and a continuation ``x_1..x_n`` (token ids; lm-eval
tokenises, an empty context becomes the end-of-text id)::

    loglikelihood(c, x) = sum_i log softmax(logits(c, x_<i))[x_i]      (the last block_size + 1 ids)
    is_greedy           = all_i argmax logits(c, x_<i) == x_i

``loglikelihood_rolling(text)`` cuts ``[eot] + tokens(text)`` into lm-eval's disjoint windows of at
most ``block_size`` inputs (``lm_eval.utils.get_rolling_token_windows``, context length 1), so every
token is predicted exactly once, and sums their loglikelihoods. Batches are right-padded: the model
is causal (attention, n-gram hash and short conv read only earlier positions), so padding after a
row's last token changes none of its scores.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

INSTALL_HINT = "lm-eval is not installed: pip install 'engram-torch[eval]' (or pip install 'lm-eval>=0.4.13')"

try:
    import lm_eval  # noqa: F401
    import lm_eval.models  # noqa: F401 - lm-eval's own models first: registering into an empty registry hides them
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the optional extra
    raise ImportError(f"{INSTALL_HINT} ({e})") from e

import torch
from torch.nn import functional as F

from engram.evaluation.task_data import TASKS_DIR
from engram.training.checkpoint import CONFIG_FILE, is_checkpoint, load_checkpoint, resolve_checkpoint_dir
from engram.training.loop import check_device, default_device

logger = logging.getLogger(__name__)

__all__ = ["EngramLM", "make_lm", "evaluate", "checkpoint_kind", "INSTALL_HINT", "TASKS_DIR"]


def _positive_int(value: Any, name: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = None
    if v is None or v < 1 or str(v) != str(value).strip():
        raise ValueError(f"engram model: {name} must be an integer >= 1, got {value!r}")
    return v


def _device(device: str | None) -> torch.device:
    """The device to run on. As lm-eval's own ``hf`` model does, a CUDA device on a machine without
    one falls back to the default with a warning: lm-eval's command line asks for ``cuda:0`` unless
    told otherwise. (``engram eval`` and :func:`evaluate` check ``--device`` strictly first.)"""
    if device is None:
        return check_device(default_device())
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("engram model: device %r requested but CUDA is not available; using %s", device,
                       default_device())
        return check_device(default_device())
    return check_device(device)


@register_model("engram")
class EngramLM(TemplateLM):
    """An ``engram train`` checkpoint as an lm-eval model.

    Args:
        checkpoint: a checkpoint directory or an ``engram train --out`` run directory.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (default: cuda if available, else cpu).
        batch_size: sequences per forward (an integer; lm-eval's ``auto`` is not supported).
        verify: check the checkpoint's SHA-256 sums (``False``: sizes only, for huge checkpoints).
    """

    backend = "causal"

    def __init__(self, checkpoint: str, device: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, verify: bool | str = True, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"engram model: unknown model_args {sorted(kwargs)} (it takes checkpoint, device, "
                             "batch_size, verify)")
        if str(batch_size).startswith("auto"):
            raise ValueError("engram model: batch_size 'auto' is not supported; pass a number")
        self._batch_size = _positive_int(batch_size, "batch_size")
        if isinstance(verify, str):
            verify = verify.strip().lower() not in ("false", "0", "no")
        self._device = _device(device)
        ck = load_checkpoint(checkpoint, map_location=self._device, verify=bool(verify))
        if ck.tokenizer is None:
            raise ValueError(f"checkpoint {str(ck.path)!r} has no tokenizer; lm-eval scores text, so it needs one")
        if ck.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {str(ck.path)!r} has no end-of-text token (lm-eval starts texts with it)")
        self.model = ck.model.eval()
        self.tokenizer = ck.tokenizer
        self.checkpoint_path = ck.path

    # ------------------------------------------------------------------ what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        """Input tokens per forward: the model's context, ``block_size``."""
        return int(self.model.config.block_size)

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"engram-{self.checkpoint_path}".replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """``(loglikelihood, is_greedy)`` of each ``(key, context ids, continuation ids)``."""
        from tqdm import tqdm  # noqa: PLC0415

        block = self.max_length
        windows = []  # per request: (inputs, targets, n): the last block + 1 ids of context + continuation
        for key, ctx, cont in requests:
            if not cont:
                raise ValueError(f"lm-eval asked for the loglikelihood of an empty continuation ({key!r})")
            if not ctx:
                raise ValueError(f"lm-eval asked for a continuation without context ({key!r})")
            if len(cont) > block:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit the model's context of {block}")
            whole = (list(ctx) + list(cont))[-(block + 1):]
            windows.append((whole[:-1], whole[1:], len(cont)))
        # Longest first, so a batch holds rows of similar length (less padding).
        order = sorted(range(len(requests)), key=lambda i: -len(windows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        bs = self.batch_size
        for start in tqdm(range(0, len(order), bs), disable=disable_tqdm, desc="loglikelihood"):
            rows = order[start:start + bs]
            L = max(len(windows[i][0]) for i in rows)
            x = torch.full((len(rows), L), self.eot_token_id, dtype=torch.long)  # (b, L), right-padded
            for r, i in enumerate(rows):
                x[r, :len(windows[i][0])] = torch.tensor(windows[i][0])
            logits, _ = self.model(x.to(self.device))  # (b, L, V)
            logp = F.log_softmax(logits.float(), dim=-1)  # (b, L, V)
            for r, i in enumerate(rows):
                inp, tgt, n = windows[i]
                T = len(inp)
                lp = logp[r, T - n:T]  # (n, V): the positions that predict the continuation
                t = torch.tensor(tgt[-n:], device=lp.device)  # (n,)
                ll = float(lp.gather(-1, t[:, None]).sum())
                greedy = bool((lp.argmax(-1) == t).all())
                out[i] = (ll, greedy)
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, (ll, greedy))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of each whole text, in disjoint windows of at most ``block_size``
        inputs (the first window starts from the end-of-text token)."""
        flat, owner = [], []
        for n, (text,) in enumerate(r.args for r in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                flat.append((None, ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self._loglikelihood_tokens(flat, disable_tqdm=disable_tqdm)):
            totals[n] += ll
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context (the model's ``generate``, KV cache), cut before the
        first stop string (``until``) or end-of-text, at most ``max_gen_toks`` tokens."""
        from tqdm import tqdm  # noqa: PLC0415

        eot = self.tok_decode([self.eot_token_id])
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="generate_until"):
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = _positive_int(kw.pop("max_gen_toks", self.max_gen_toks), "max_gen_toks")
            if kw.pop("do_sample", False) or float(kw.pop("temperature", 0.0) or 0.0) > 0:
                raise ValueError("engram model: generate_until decodes greedily only (do_sample=False, temperature=0)")
            if kw:
                logger.warning("engram model: ignoring generation arguments %s (greedy decoding)", sorted(kw))
            max_new = min(max_new, self.max_length - 1)
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.eot_token_id]
            x = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
            new = self.model.generate(x, max_new, temperature=0)[0, len(ids):].tolist()
            if self.eot_token_id in new:
                new = new[:new.index(self.eot_token_id)]
            text = self.tok_decode(new)
            for stop in [*until, eot]:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out


# ---------------------------------------------------------------------- which model a directory needs
def checkpoint_kind(path: str | Path) -> str:
    """``"engram"`` for an ``engram train`` checkpoint or run directory, ``"hf"`` for a transformers
    ``save_pretrained`` directory (an ``EngramForCausalLM``, or a plain causal LM to compare with);
    ``ValueError`` for anything else."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--checkpoint {str(p)!r} does not exist")
    try:
        root = resolve_checkpoint_dir(p)
    except ValueError:
        if (p / "checkpoints").is_dir():
            raise
        root = p
    if is_checkpoint(root):
        return "engram"
    if (p / CONFIG_FILE).is_file():
        return "hf"
    raise ValueError(f"--checkpoint {str(p)!r} is neither an engram train checkpoint or run directory nor a "
                     "transformers model directory (no config.json)")


def make_lm(checkpoint: str | Path, device: str | None = None, batch_size: int = 1) -> Any:
    """The lm-eval model for ``checkpoint``: :class:`EngramLM` for ``engram train`` output, lm-eval's
    ``HFLM`` for a ``save_pretrained`` directory (``EngramForCausalLM`` found through ``engram.hf``)."""
    if checkpoint_kind(checkpoint) == "engram":
        return EngramLM(str(checkpoint), device=device, batch_size=batch_size)
    import engram.hf  # noqa: F401,PLC0415 - registers EngramForCausalLM with the Auto classes
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

    return HFLM(pretrained=str(checkpoint), device=str(_device(device)), batch_size=batch_size)


def evaluate(checkpoint: str | Path, tasks: list[str], include_path: list[str | Path] | None = None,
             limit: float | None = None, batch_size: int = 1, device: str | None = None,
             log_samples: bool = False, **kwargs: Any) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``checkpoint`` (see :func:`make_lm`) on ``tasks``, with Engram's
    tasks (``engram_ppl``, ``engram_mc``) and ``include_path`` directories on the task path. Returns
    lm-eval's results dict (``results["results"][task][metric]``); ``kwargs`` go to ``simple_evaluate``."""
    from lm_eval import simple_evaluate  # noqa: PLC0415
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    if not tasks:
        raise ValueError("no tasks given")
    device = str(check_device(device)) if device is not None else None  # strict here: the user named it
    paths = [str(TASKS_DIR)] + [str(p) for p in include_path or []]
    for p in paths[1:]:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"--include-path {p!r} is not a directory")

    def unknown(m: TaskManager) -> list[str]:
        return [t for t in tasks if t not in m.all_tasks and not Path(t).is_file()]

    # Indexing lm-eval's ~15,000 bundled task files takes seconds: only when a task is not ours.
    manager = TaskManager(include_path=paths, include_defaults=False)
    if unknown(manager):
        manager = TaskManager(include_path=paths)
    if unknown(manager):
        raise ValueError(f"unknown task(s) {unknown(manager)}: see `lm_eval ls tasks`, or add a task directory "
                         "with --include-path")
    lm = make_lm(checkpoint, device=device, batch_size=batch_size)
    return simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                           log_samples=log_samples, **kwargs)
