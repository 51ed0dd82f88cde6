"""The training loop shared by ``engram study`` and ``engram train``.

Shapes: B batch, T context length.

:class:`Trainer` owns one model, its optimizers (:func:`engram.training.optim.build_optimizer`: AdamW for
dense weights, Adam at 5x lr without decay for tables), the schedule (linear warmup, then cosine or
linear decay of every group's ``base_lr``), gradient clipping and its own clock: ``elapsed``
counts only the seconds spent inside :meth:`Trainer.train_step`, so several trainers can be
interleaved in one process (``engram study``) and background load hits all of them alike.
Evaluation time is kept apart (``eval_seconds``).

Batches are a pure function of ``(seed, step)`` and the schedule of the step (or of the own clock
with a time budget), so a run resumed from a checkpoint ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from engram.training.data import TokenBatcher
from engram.models.gpt import EngramGPT, GPTConfig
from engram.training.optim import build_optimizer, clip_grad_norm_
from engram.training.prehash import HashAhead


LOSS_SYNC_EVERY = 10  # steps between loss read-backs on an accelerator (one host stall each)


@dataclass
class TrainConfig:
    """Optimisation and budget settings.

    Args:
        lr: base learning rate of the dense weights (tables get ``table_lr_mult`` x it).
        min_lr_ratio: the decay ends at ``lr * min_lr_ratio``.
        warmup_steps: linear warmup steps.
        decay: ``"cosine"`` or ``"linear"`` decay after warmup (over steps, or over the own clock
            with a time budget).
        weight_decay: AdamW decay of dense matrices (tables never decay).
        table_lr_mult: table learning-rate multiplier (the paper: 5).
        grad_clip: max global gradient norm (0 = off).
        batch_size, seq_len: B and T.
        seed: seed of the weights' init and of the token stream.
        max_steps: step budget (``None``: only the time budget).
        time_budget: seconds of own training time (``None``: only the step budget).
        eval_points: held-out evaluations spread over the budget (plus one at step 0).
        eval_tokens: held-out tokens per evaluation.
        checkpoint_every: save every N steps (0 = only at the end).
        grad_accum: split each batch into this many micro-batches, accumulating gradients (the
            same update as the whole batch, to float rounding; less activation memory).
        dtype: ``"bf16"`` / ``"fp16"``: autocast for the dense math (parameters, tables and
            optimizer state stay fp32); ``"fp32"``: none.
        compile: run the model's forward through ``torch.compile``.
    """

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    decay: str = "cosine"
    weight_decay: float = 0.1
    table_lr_mult: float = 5.0
    grad_clip: float = 1.0
    batch_size: int = 16
    seq_len: int = 128
    seed: int = 0
    max_steps: int | None = 300
    time_budget: float | None = None
    eval_points: int = 8
    eval_tokens: int = 16384
    checkpoint_every: int = 0
    grad_accum: int = 1
    dtype: str = "fp32"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"grad_accum={self.grad_accum} must be >= 1 and divide batch_size={self.batch_size} "
                             "(the batch is split into grad_accum micro-batches)")
        if self.dtype not in AUTOCAST:
            raise ValueError(f"dtype={self.dtype!r} must be one of {', '.join(AUTOCAST)}")
        if self.max_steps is None and self.time_budget is None:
            raise ValueError("give a step budget (max_steps) or a time budget (time_budget)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps!r} must be >= 1")
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget={self.time_budget!r} must be > 0 seconds")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"decay={self.decay!r} must be 'cosine' or 'linear'")
        for name in ("warmup_steps", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        for name in ("batch_size", "seq_len", "eval_points", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"grad_clip={self.grad_clip!r} must be a finite number >= 0 (0 = off)")
        for name in ("lr", "table_lr_mult", "weight_decay"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a finite number")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: --dtype -> the autocast dtype (None: no autocast).
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(device: str | torch.device, dtype: str = "fp32") -> torch.device:
    """``torch.device(device)`` if it exists here and supports ``dtype``, else a ``ValueError`` that says so."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device torch knows ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: no CUDA device is available here (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'no'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if dtype == "bf16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--dtype bf16: {torch.cuda.get_device_name(dev)} does not support bfloat16; use fp16 or fp32")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"--device {device!r}: MPS is not available here")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device!r}: only cpu, cuda and mps are supported")
    if dtype == "fp16" and dev.type == "cpu":
        raise ValueError("--dtype fp16 needs a GPU (on CPU it is slow and needs loss scaling); use --dtype bf16")
    return dev


def default_device() -> str:
    """``"cuda"`` if a CUDA device is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Multiplier of every group's ``base_lr``: linear warmup over steps, then decay over ``progress`` in [0, 1]."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * p)) if cfg.decay == "cosine" else 1 - p
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm over all ``params`` (sparse table gradients included).

    Uses :func:`engram.training.optim.clip_grad_norm_`, which counts a sparse gradient's coalesced rows and
    scales dense and sparse gradients by one factor. Returns the norm before clipping (0 if off).
    """
    if max_norm <= 0:
        return torch.zeros(())
    return clip_grad_norm_(params, max_norm)  # a tensor: reading it back would stall the host


def build_model(config: GPTConfig, tokenizer: Any, seed: int) -> EngramGPT:
    """``EngramGPT(config, tokenizer)`` with weights drawn from ``seed``.

    The dense weights are those of the same model without Engram built from ``seed`` (every
    parameter both have, of the same shape), so the variants of a study start from one dense
    initialisation: building the Engram branches draws from the generator too, and would
    otherwise shift every draw after them. With a zero-initialised value projection the Engram
    model then starts as exactly the baseline.
    """
    torch.manual_seed(seed)
    model = EngramGPT(config, tokenizer)
    if config.engram is not None:
        torch.manual_seed(seed)
        dense = EngramGPT(dataclasses.replace(config, engram=None), None).state_dict()
        mine = model.state_dict()
        shared = {k: v for k, v in dense.items() if k in mine and mine[k].shape == v.shape}
        model.load_state_dict(shared, strict=False)
    return model


def rss_mb() -> float:
    """Current resident set size of this process in MB (``/proc``; peak RSS where that is missing)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 1e6
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_bytes() -> int:
    """This process's peak resident set size: ``VmHWM`` (per address space, so a child started by
    fork+exec does not inherit its parent's peak, as ``ru_maxrss`` does on Linux); ``ru_maxrss``
    where ``/proc`` is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB."""
    return peak_rss_bytes() / 1e6


def state_bytes(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes of parameters, gradients and optimizer state (exact, unlike process RSS)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
        if p.grad is not None and not p.grad.is_sparse:
            total += p.grad.numel() * p.grad.element_size()
    for opt in optimizers:
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
    return total


@dataclass
class CurvePoint:
    step: int
    seconds: float
    tokens: int
    val_loss: float


class Trainer:
    """Trains one model on a token stream with its own clock, optimizers and curve.

    Args:
        model: the model (already initialised, e.g. by :func:`build_model`).
        batcher: the training stream (shared seed across interleaved trainers).
        config: optimisation and budget settings.
        eval_data: held-out ``(inputs, targets)`` batches, each ``(B, T)``.
        name: label for progress bars and reports.
    """

    def __init__(self, model: EngramGPT, batcher: TokenBatcher, config: TrainConfig,
                 eval_data: list[tuple[torch.Tensor, torch.Tensor]] | None = None, name: str = "model",
                 device: str | torch.device | None = None, hash_ahead: bool = True):
        self.model, self.batcher, self.config, self.name = model, batcher, config, name
        self.device = check_device(device if device is not None else next(model.parameters()).device, config.dtype)
        self.model.to(self.device)
        self.eval_data = eval_data or []
        self.forward = torch.compile(model) if config.compile else model
        # the next batch and its Engram row ids, made on the CPU in a background thread while a
        # step runs (engram.training.prehash); False: the model hashes inside the step
        hashing = getattr(model, "hashing", None)
        self.hash_ahead = (HashAhead(batcher, hashing, pin=self.device.type == "cuda")
                           if hash_ahead and hashing is not None else None)
        self.scaler = torch.amp.GradScaler(self.device.type) if config.dtype == "fp16" else None
        self.optimizers = build_optimizer(model, config.lr, weight_decay=config.weight_decay,
                                          table_lr_mult=config.table_lr_mult)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step = 0
        self.elapsed = 0.0  # seconds inside train_step only
        self.eval_seconds = 0.0
        self.tokens = 0
        self.world_size = 1  # processes sharing each batch (engram.distributed): tokens count the global batch
        self.step_times: list[float] = []
        self.losses: list[float] = []
        self.curve: list[CurvePoint] = []
        self._next_eval = 0.0  # progress fraction of the next evaluation
        # Reading a loss back stalls the host until the device has caught up, so on an
        # accelerator losses (and step times, from CUDA events) are read every `sync_every`
        # steps; a time budget needs its clock every step. On a CPU reading back costs nothing.
        on_cpu = self.device.type == "cpu"
        self.sync_every = 1 if on_cpu or config.time_budget is not None else LOSS_SYNC_EVERY
        self._pending: list[tuple[torch.Tensor, Any, Any, float]] = []  # (loss, start, end events, host s)

    # ------------------------------------------------------------------ budget
    @property
    def progress(self) -> float:
        """Fraction of the budget used (the larger of the step and time fractions)."""
        c = self.config
        p = 0.0
        if c.max_steps is not None:
            p = max(p, self.step / c.max_steps)
        if c.time_budget is not None:
            p = max(p, self.elapsed / c.time_budget)
        return p

    @property
    def done(self) -> bool:
        return self.progress >= 1.0

    def eval_due(self) -> bool:
        """True at step 0, each 1/eval_points of the budget, and at the end."""
        if self.curve and self.curve[-1].step == self.step:
            return False
        return self.progress >= min(self._next_eval, 1.0)

    # ------------------------------------------------------------------ steps
    def set_lr(self) -> float:
        f = lr_factor(self.step, self.progress, self.config)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
        return f

    def _to_device(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or t.device == self.device:
            return t
        if self.device.type == "cuda":
            t = t.pin_memory()  # page-locked: the copy below overlaps with the GPU's work
        return t.to(self.device, non_blocking=True)

    def _loss(self, x: torch.Tensor, y: torch.Tensor, doc_starts: torch.Tensor | None,
              hash_ids: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        dtype = AUTOCAST[self.config.dtype]
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if hash_ids is not None:  # hashed ahead (doc_starts were applied there)
                _, loss = self.forward(x, y, hash_ids=hash_ids)
            else:
                _, loss = self.forward(x, y) if doc_starts is None else self.forward(x, y, doc_starts=doc_starts)
        return loss

    def micro_batch(self, i: int, n: int) -> Any:
        """Context of micro-batch ``i`` of ``n`` (forward and backward); a data-parallel trainer
        skips the gradient all-reduce of all but the last one."""
        return contextlib.nullcontext()

    def clip_gradients(self) -> torch.Tensor:
        """Clip the global gradient norm of this step (a sharded trainer sums its norm over ranks)."""
        return clip_gradients(self.params, self.config.grad_clip)

    def agreed_stop(self, signum: int | None) -> int | None:
        """The stop signal every process acts on (one process: its own)."""
        return signum

    def train_step(self) -> float:
        """One optimisation step on batch ``self.step``; returns the latest training loss read
        back (this step's on a CPU; on an accelerator, up to ``sync_every - 1`` steps older)."""
        t0 = time.perf_counter()
        timed = self.device.type == "cuda"
        if timed:  # the step's device time, read at the next sync (no stall here)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        self.model.train()
        self.set_lr()
        # (B, T) inputs and targets; doc_starts (B, T) bool where a prepared corpus knows its
        # document boundaries (the n-gram history restarts there), else None.
        if self.hash_ahead is not None:  # {layer: (B, T, H)} row ids, made while the last step ran
            x, y, doc_starts, hash_ids = self.hash_ahead.get(self.step)
            hash_ids = {k: self._to_device(v) for k, v in hash_ids.items()}
        else:
            (x, y, doc_starts), hash_ids = self.batcher.batch_with_boundaries(self.step), None
        x, y, doc_starts = self._to_device(x), self._to_device(y), self._to_device(doc_starts)
        n = self.config.grad_accum
        total = torch.zeros((), device=self.device)
        for i in range(n):  # micro-batches of B / n rows: the mean over all B rows, accumulated
            part = slice(i * x.shape[0] // n, (i + 1) * x.shape[0] // n)
            with self.micro_batch(i, n):
                loss = self._loss(x[part], y[part], None if doc_starts is None else doc_starts[part],
                                  None if hash_ids is None else {k: v[part] for k, v in hash_ids.items()}) / n
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += loss.detach()
        if self.scaler:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
        self.clip_gradients()
        for opt in self.optimizers:
            self.scaler.step(opt) if self.scaler else opt.step()
        if self.scaler:
            self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if timed:
            end.record()
        self._pending.append((total, start if timed else None, end if timed else None, t0))
        self.step += 1
        self.tokens += x.numel() * self.world_size
        if len(self._pending) >= self.sync_every:
            self.sync()
        return self.losses[-1] if self.losses else float("nan")

    def sync(self) -> None:
        """Read back the losses (and step times) of the steps since the last sync: one host
        stall for all of them. Raises ``FloatingPointError`` at the first non-finite loss."""
        if not self._pending:
            return
        values = torch.stack([p[0] for p in self._pending]).tolist()  # the one host sync
        now = time.perf_counter()
        for (_, start, end, t0), value in zip(self._pending, values):
            dt = start.elapsed_time(end) / 1000 if start is not None else now - t0
            self.elapsed += dt
            self.step_times.append(dt)
            self.losses.append(value)
        first = self.step - len(self._pending)
        self._pending.clear()
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise FloatingPointError(f"{self.name}: training loss is {value} at step {first + i + 1}; lower --lr")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out loss per token; appends a curve point. Its time is not training time."""
        if not self.eval_data:
            raise ValueError("no held-out data to evaluate on")
        self.sync()
        t0 = time.perf_counter()
        self.model.eval()
        total, count = 0.0, 0
        for batch in self.eval_data:
            x, y = batch
            doc_starts = self._to_device(getattr(batch, "doc_starts", None))
            loss = self._loss(self._to_device(x), self._to_device(y), doc_starts)
            total += float(loss) * y.numel()
            count += y.numel()
        val = total / count
        self.curve.append(CurvePoint(self.step, self.elapsed, self.tokens, val))
        while self._next_eval <= self.progress:
            self._next_eval += 1.0 / self.config.eval_points
        self.eval_seconds += time.perf_counter() - t0
        return val

    # ------------------------------------------------------------------ reporting
    @property
    def step_seconds_median(self) -> float:
        # The first steps pay one-off allocation costs; skip them when there are enough steps.
        times = self.step_times[3:] if len(self.step_times) > 10 else self.step_times
        return statistics.median(times) if times else float("nan")

    def summary(self) -> dict[str, Any]:
        """The per-run fields of ``report.json``."""
        self.sync()
        counts = self.model.num_params()
        final = self.curve[-1].val_loss if self.curve else float("nan")
        return {
            "name": self.name,
            "config": self.model.config.to_dict(),
            "train_config": self.config.to_dict(),
            "params_dense": counts["dense"],
            "params_table": counts["table"],
            "steps": self.step,
            "tokens": self.tokens,
            "wall_seconds": self.elapsed,
            "eval_seconds": self.eval_seconds,
            "tokens_per_second": self.tokens / self.elapsed if self.elapsed > 0 else float("nan"),
            "step_seconds_median": self.step_seconds_median,
            "final_train_loss": statistics.fmean(self.losses[-10:]) if self.losses else float("nan"),
            "final_val_loss": final,
            "state_mb": state_bytes(self.model, self.optimizers) / 1e6,
            "curve": [asdict(c) for c in self.curve],
        }

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Everything beyond the weights that an exact resume needs."""
        self.sync()
        return {
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "step": self.step,
            "elapsed": self.elapsed,
            "eval_seconds": self.eval_seconds,
            "tokens": self.tokens,
            "step_times": list(self.step_times),
            "losses": list(self.losses),
            "curve": [asdict(c) for c in self.curve],
            "next_eval": self._next_eval,
            "train_config": self.config.to_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        opts = state["optimizers"]
        if len(opts) != len(self.optimizers):
            raise ValueError(f"the checkpoint has {len(opts)} optimizers but this model needs {len(self.optimizers)}")
        for opt, sd in zip(self.optimizers, opts):
            opt.load_state_dict(sd)
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        self.eval_seconds, self.tokens = float(state["eval_seconds"]), int(state["tokens"])
        self.step_times, self.losses = list(state["step_times"]), list(state["losses"])
        self.curve = [CurvePoint(**c) for c in state["curve"]]
        self._next_eval = float(state["next_eval"])
        torch.set_rng_state(state["torch_rng"])


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM between two whole steps (after saving, if a ``save`` was given)."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step
        super().__init__(f"{self.signal_name} at step {step}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class StopSignals:
    """``with StopSignals() as stop:`` SIGINT (Ctrl-C) and SIGTERM (``timeout``, schedulers) set
    ``stop.signum`` instead of interrupting, so a loop can stop between whole steps; a second
    SIGINT raises ``KeyboardInterrupt`` at once. Outside the main thread it installs nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) is not signal.SIG_IGN:  # an ignored signal (nohup, &) stays ignored
                    self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def run_training(trainer: Trainer, save: Callable[[Trainer], Any] | None = None,
                 progress_bar: bool = True) -> dict[str, Any]:
    """Train until the budget is spent, evaluating on schedule; returns :meth:`Trainer.summary`.

    ``save(trainer)`` is called every ``checkpoint_every`` steps and at the end. SIGINT or SIGTERM
    stop the loop after the step in progress: the state is saved (never a half-done step) and
    :class:`TrainingInterrupted` is raised. A second Ctrl-C aborts at once without saving.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    cfg = trainer.config
    total = cfg.max_steps if cfg.max_steps is not None else None
    bar = tqdm(total=total, initial=trainer.step, desc=trainer.name, disable=not progress_bar,
               unit="step", dynamic_ncols=True)
    saved_at = -1
    stopping: int | None = None  # the signal all processes stop on

    def save_now() -> None:
        nonlocal saved_at
        if save is not None and saved_at != trainer.step:
            save(trainer)
            saved_at = trainer.step

    with StopSignals() as stop:
        try:
            while True:
                # The evaluation due at this step runs even when a signal came: an uninterrupted
                # run makes it here too, so the resumed curve is the same.
                if trainer.eval_data and trainer.eval_due():
                    bar.set_postfix_str(f"val {trainer.evaluate():.3f}", refresh=False)
                stopping = trainer.agreed_stop(stop.signum)
                if trainer.done or stopping is not None:
                    break
                loss = trainer.train_step()
                bar.update(1)
                tps = trainer.tokens / max(trainer.elapsed, 1e-9)
                eta = (1 - trainer.progress) * trainer.elapsed / max(trainer.progress, 1e-9)
                bar.set_postfix_str(f"loss {loss:.3f} | {tps:,.0f} tok/s | eta {eta:.0f}s", refresh=False)
                if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0 and not trainer.done:
                    save_now()
            bar.close()
            if stopping is not None:
                print(f"\n{signal.Signals(stopping).name} at step {trainer.step}: "
                      + ("saving a checkpoint first" if save is not None else "stopping"), file=sys.stderr)
            save_now()
        finally:
            bar.close()
        if stopping is not None and not trainer.done:
            raise TrainingInterrupted(stopping, trainer.step)
    return trainer.summary()


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace`` (never a half-written file)."""
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)
