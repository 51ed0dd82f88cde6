"""Save and load ``EngramGPT`` checkpoints (weights, config, tokenizer, training state).

A checkpoint is a directory::

    config.json          format version, GPTConfig, Engram hashing state, tokenizer fingerprint
    model.safetensors    weights (tied embeddings stored once)
    tokenizer/           the HF tokenizer (``save_pretrained``)
    training_state.pt    optimizers, trainer counters, RNG (optional; for ``--resume``)

The hashing state (compressed-tokenizer table, multipliers, table sizes) is stored, so loading
never rebuilds the compression from the tokenizer differently; the tokenizer that ships with the
checkpoint is checked against the stored fingerprint. Writes go to a temporary sibling directory
that replaces the old checkpoint with ``os.replace``, so a crash mid-save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engram.models.gpt import EngramGPT, GPTConfig
from engram.core.hashing import check_same_compression
from engram.core.tokenizer import CompressedTokenizer

FORMAT_NAME = "engram-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR, STATE_FILE = "config.json", "model.safetensors", "tokenizer", "training_state.pt"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model, its tokenizer, the ``config.json`` contents, the training state."""

    model: EngramGPT
    tokenizer: Any
    meta: dict[str, Any]
    training_state: dict[str, Any] | None = None
    path: Path = field(default_factory=Path)


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` holds a ``config.json`` written by this module (any version)."""
    cfg = Path(path) / CONFIG_FILE
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def resolve_checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or ``path/checkpoint`` (the layout ``engram train --out`` writes)."""
    p = Path(path)
    if not (p / CONFIG_FILE).exists() and (p / "checkpoint" / CONFIG_FILE).exists():
        return p / "checkpoint"
    return p


def _serialisable_config(model: EngramGPT) -> dict[str, Any]:
    d = model.config.to_dict()
    if model.hashing is not None:
        # Pin the resolved raw pad id so the model rebuilds from the stored table alone.
        d["engram"]["pad_id"] = model.hashing.raw_pad_id
        d["engram"]["tokenizer_vocab_size"] = model.hashing.compressed.raw_vocab_size
    return d


def save_checkpoint(path: str | os.PathLike[str], model: EngramGPT, tokenizer: Any,
                    training_state: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically (replacing an older checkpoint at ``path``).

    Raises ``ValueError`` if ``path`` exists, is not empty and is not an engram checkpoint.
    """
    from safetensors.torch import save_model  # noqa: PLC0415

    from engram import __version__  # noqa: PLC0415

    target = Path(path)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not is_checkpoint(target))):
        raise ValueError(f"{str(target)!r} exists and is not an engram checkpoint; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "engram_version": __version__,
            "gpt_config": _serialisable_config(model),
            "hashing": model.hashing.state_dict_extra() if model.hashing is not None else None,
            "tokenizer_fingerprint": model.hashing.compressed.fingerprint() if model.hashing is not None else None,
            "extra": extra or {},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta))
        save_model(model, str(tmp / WEIGHTS_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        if training_state is not None:
            torch.save(training_state, tmp / STATE_FILE)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    cfg = path / CONFIG_FILE
    if not cfg.exists():
        raise ValueError(f"{str(path)!r} is not an engram checkpoint (no {CONFIG_FILE})")
    try:
        meta = json.loads(cfg.read_text())
    except ValueError as e:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt: {CONFIG_FILE} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{str(path)!r} is not an engram checkpoint ({CONFIG_FILE} lacks format={FORMAT_NAME!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {version!r} (written by engram "
            f"{meta.get('engram_version')!r}); this engram reads version {FORMAT_VERSION}"
        )
    return meta


def load_checkpoint(path: str | os.PathLike[str], load_training_state: bool = False,
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` (``path`` or ``path/checkpoint``).

    Raises ``ValueError`` for a missing, corrupt or other-version checkpoint and for a tokenizer
    whose compression fingerprint differs from the one the model was trained with.
    """
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_model  # noqa: PLC0415

    root = resolve_checkpoint_dir(path)
    meta = _read_meta(root)
    try:
        gcfg = GPTConfig.from_dict(dict(meta["gpt_config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {str(root)!r} is corrupt: bad gpt_config ({e})") from e
    tokenizer = None
    if (root / TOKENIZER_DIR).exists():
        from transformers import AutoTokenizer  # noqa: PLC0415

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"checkpoint {str(root)!r} has an unreadable tokenizer: {e}") from e
    compressed = None
    if gcfg.engram is not None:
        hashing = meta.get("hashing") or {}
        try:
            compressed = CompressedTokenizer.from_state_dict(hashing["compressed"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"checkpoint {str(root)!r} is corrupt: bad hashing state ({e})") from e
        if tokenizer is not None:
            check_same_compression(compressed, tokenizer, f"checkpoint {str(root)!r}")
    model = EngramGPT(gcfg, compressed)
    if model.hashing is not None:
        model.hashing.check_same_as_saved(meta["hashing"], f"checkpoint {str(root)!r}")
    weights = root / WEIGHTS_FILE
    if not weights.exists():
        raise ValueError(f"checkpoint {str(root)!r} is incomplete: no {WEIGHTS_FILE}")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {str(root)!r} is corrupt: cannot read {WEIGHTS_FILE} ({e})") from e
    tied = {"lm_head.weight", "wte.weight"} if gcfg.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint {str(root)!r} does not match its config: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    model.to(map_location)
    state = None
    if load_training_state:
        sp = root / STATE_FILE
        if not sp.exists():
            raise ValueError(f"checkpoint {str(root)!r} has no {STATE_FILE}; it cannot be resumed")
        try:
            state = torch.load(sp, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle/zip errors come in many types
            raise ValueError(f"checkpoint {str(root)!r} is corrupt: cannot read {STATE_FILE} ({e})") from e
    return Checkpoint(model, tokenizer, meta, state, root)



class RunLock:
    """Exclusive use of a run directory while a command writes into it (``with RunLock(out):``).

    A second ``engram train`` / ``engram study`` on the same ``--out`` fails at once instead of
    both runs writing and one being lost. The lock is an ``flock`` on the directory itself, so no
    file is added to it, and the OS releases it when the process ends (``kill -9`` included). A
    directory this lock created is removed again if the run wrote nothing into it (bad input
    writes nothing). Where ``fcntl`` is missing (Windows) the directory is not locked.
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> "RunLock":
        check_output_dir(self.out)
        self._created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl  # noqa: PLC0415 - POSIX only
        except ImportError:
            return self
        fd = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ValueError(f"{str(self.out)!r} is in use by another engram run; wait for it to finish or "
                             "choose another --out") from None
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._created and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()  # created for a run that wrote nothing
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


def check_output_dir(out: str | os.PathLike) -> None:
    """``ValueError`` now, not after training, if ``out`` cannot be a writable directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a directory")
    parent = out
    while not parent.exists():  # the nearest existing ancestor must be a writable directory
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {str(out)!r}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(out)!r}: {str(parent)!r} is not writable")
