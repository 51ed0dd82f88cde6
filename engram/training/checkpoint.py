"""Save and load ``EngramGPT`` checkpoints (weights, config, tokenizer, training state), and the
checkpoints of a run directory.

A checkpoint is a directory::

    config.json          format version, GPTConfig, Engram hashing state, tokenizer fingerprint
    model.safetensors    weights (tied embeddings stored once)
    tokenizer/           the HF tokenizer (``save_pretrained``)
    training_state.pt    optimizers, trainer counters, RNG (optional; for ``--resume``)
    manifest.json        size and SHA-256 of every other file; written last

The hashing state (compressed-tokenizer table, multipliers, table sizes) is stored, so loading
never rebuilds the compression from the tokenizer differently; the tokenizer that ships with the
checkpoint is checked against the stored fingerprint.

**Complete or absent.** Files are written into a hidden sibling directory, flushed to disk
(``fsync``), the manifest last, and the directory is then renamed into place. A checkpoint
without its manifest is incomplete (an interrupted save) and is never loaded; one whose files
differ from the manifest (size, or SHA-256 when ``verify``) is refused as corrupt. SHA-256 runs
at about 1.7 GB/s on one core of a 2020s x86 CPU; ``verify=False`` (``--no-verify``) checks
sizes only, for huge checkpoints.

**Run directories** (``engram train --out DIR``) keep several checkpoints and a pointer::

    DIR/checkpoints/step-00000300/   one complete checkpoint per save
    DIR/checkpoints/latest           the name of the newest complete one (replaced atomically)

A save writes a new ``step-N`` directory (one rename, nothing replaced), then moves the pointer
(one ``os.replace``), then prunes all but the newest ``keep_last``. A kill at any instant leaves
the pointer on a complete checkpoint; :func:`resolve_checkpoint_dir` follows it and falls back
to the newest complete checkpoint if the pointer is missing or damaged. Leftovers of interrupted
saves are removed by :func:`clean_run_dir` at the start of the next run. Names in the pointer
are checked (``step-<digits>``), so a crafted pointer cannot lead outside the run directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engram.models.gpt import EngramGPT, GPTConfig
from engram.core.hashing import check_same_compression
from engram.core.tokenizer import CompressedTokenizer
from engram.training.shards import fill_full_state, is_sharded, load_full_tables

FORMAT_NAME = "engram-checkpoint"
#: 2: ``manifest.json`` with the size and SHA-256 of every file. 1 (no manifest) still loads, unverified.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR, STATE_FILE = "config.json", "model.safetensors", "tokenizer", "training_state.pt"
MANIFEST_FILE = "manifest.json"
CHECKPOINTS_DIR, LATEST_FILE = "checkpoints", "latest"
_STEP_NAME = re.compile(r"^step-(\d{8,})(?:-r(\d+))?$")
_TMP_PREFIX = ".tmp-"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions, ...); the previous one is intact."""


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


# ---------------------------------------------------------------------- integrity
def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the data files were synced
        pass
    finally:
        os.close(fd)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(root: Path) -> None:
    """Flush every file under ``root`` to disk, then write ``manifest.json`` (size + SHA-256 of each)."""
    entries = {}
    for p in _files(root):
        _fsync(p)
        entries[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    tmp = root / f"{MANIFEST_FILE}{_TMP_PREFIX}{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT_NAME, "files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST_FILE)
    _fsync(root)


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((root / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
        return None
    return m


def is_complete(path: str | os.PathLike[str]) -> bool:
    """A checkpoint whose manifest exists and whose files all have the recorded sizes (no hashing)."""
    root = Path(path)
    m = _read_manifest(root)
    if m is None:
        return False
    try:
        return all((root / rel).stat().st_size == e["size"] for rel, e in m["files"].items())
    except (OSError, TypeError, KeyError):
        return False


def verify_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> None:
    """``ValueError`` unless every file of the manifest is present with its size (and SHA-256 when ``verify``).

    A version-1 checkpoint (written before manifests) passes with a warning.
    """
    root = Path(path)
    m = _read_manifest(root)
    if m is None:
        if (root / MANIFEST_FILE).exists():
            raise ValueError(f"checkpoint {str(root)!r} is corrupt: {MANIFEST_FILE} is unreadable")
        version = _read_meta(root).get("format_version")
        if version == 1:
            warnings.warn(f"checkpoint {str(root)!r} predates content checksums (format version 1); "
                          "loaded without verification", stacklevel=3)
            return
        raise ValueError(f"checkpoint {str(root)!r} is incomplete: no {MANIFEST_FILE} (its save was interrupted)")
    for rel, e in m["files"].items():
        f = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ValueError(f"checkpoint {str(root)!r} is corrupt: {MANIFEST_FILE} names {rel!r}")
        if not f.is_file():
            raise ValueError(f"checkpoint {str(root)!r} is incomplete: {rel} is missing")
        size = f.stat().st_size
        if size != e.get("size"):
            raise ValueError(f"checkpoint {str(root)!r} is corrupt: {rel} has {size} bytes, its manifest says "
                             f"{e.get('size')}")
        if verify and file_sha256(f) != e.get("sha256"):
            raise ValueError(f"checkpoint {str(root)!r} is corrupt: the SHA-256 of {rel} differs from its manifest "
                             "(the file was changed or damaged after the save)")


# ---------------------------------------------------------------------- run directories
def _step_key(name: str) -> tuple[int, int] | None:
    m = _STEP_NAME.match(name)
    return (int(m.group(1)), int(m.group(2) or 1)) if m else None


def run_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoints of a run directory, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(k, p) for p in root.iterdir()
             if (k := _step_key(p.name)) is not None and not p.is_symlink() and p.is_dir() and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint the run directory's pointer names, or the newest complete one if the pointer
    is missing, damaged or names an incomplete checkpoint; ``None`` if there is none."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    try:
        name = (root / LATEST_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if _step_key(name) is not None and not (root / name).is_symlink() and is_complete(root / name):
        return root / name
    complete = run_checkpoints(run_dir)
    if complete and name:
        warnings.warn(f"{str(root / LATEST_FILE)!r} names {name!r}, which is not a complete checkpoint; "
                      f"using the newest complete one, {complete[-1].name}", stacklevel=2)
    return complete[-1] if complete else None


def _write_pointer(root: Path, name: str) -> None:
    tmp = root / f"{LATEST_FILE}{_TMP_PREFIX}{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST_FILE)
    _fsync(root)


def _remove_checkpoint(path: Path) -> None:
    if path.is_symlink():  # not ours to delete: never follow a link out of the run directory
        path.unlink()
        return
    (path / MANIFEST_FILE).unlink(missing_ok=True)  # incomplete from here on, so never loaded half-deleted
    shutil.rmtree(path, ignore_errors=True)


def clean_run_dir(run_dir: str | os.PathLike[str]) -> list[str]:
    """Remove what interrupted saves left in a run directory (temporary directories and files,
    incomplete checkpoints other than the pointer's); returns the names removed.

    Call it only while holding the directory (:class:`RunLock`): it assumes no save is running.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    legacy = Path(run_dir) / "checkpoint"  # engram train's layout before run directories had checkpoints/
    removed = [q.name for q in clean_siblings(legacy)]
    if not root.is_dir():
        return removed
    latest = latest_checkpoint(run_dir)
    for p in sorted(root.iterdir()):
        if p.is_symlink() and (_TMP_PREFIX in p.name or _step_key(p.name) is not None):
            p.unlink()  # a link where a checkpoint belongs: removed, its target left alone
        elif _TMP_PREFIX in p.name:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        elif _step_key(p.name) is not None and p != latest and not is_complete(p):
            _remove_checkpoint(p)
        else:
            continue
        removed.append(p.name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        return True
    return True


def clean_siblings(target: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed saves of ``save_checkpoint(target)`` left beside it (``.NAME.tmp-PID``,
    ``.NAME.old-PID`` of processes no longer running); an ``.old`` copy stays while ``target`` is
    missing (it is then the only checkpoint). Returns the paths removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for q in target.parent.glob(f".{target.name}.*-*"):
        kind, _, pid = q.name[len(target.name) + 2:].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
            continue
        if kind == "old" and not is_complete(target) and not (target / CONFIG_FILE).exists():
            continue
        if q.is_symlink() or not q.is_dir():
            q.unlink()
        else:
            shutil.rmtree(q, ignore_errors=True)
        removed.append(q)
    return removed


def save_run_checkpoint(run_dir: str | os.PathLike[str], model: EngramGPT, tokenizer: Any, step: int,
                        training_state: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                        keep_last: int = 2, extra_dirs: dict[str, Path] | None = None) -> Path:
    """Save ``DIR/checkpoints/step-<step>``, point ``latest`` at it, keep the newest ``keep_last``
    (``extra_dirs``: as :func:`save_checkpoint`)."""
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1")
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    name, n = f"step-{step:08d}", 1
    while (root / name).exists():  # a second save at the same step (e.g. Ctrl-C right after a periodic save)
        n += 1
        name = f"step-{step:08d}-r{n}"
    path = save_checkpoint(root / name, model, tokenizer, training_state, extra, extra_dirs)
    _write_pointer(root, name)
    for old in run_checkpoints(run_dir)[:-keep_last]:
        if old != path:
            _remove_checkpoint(old)
    return path


def resolve_checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory ``path`` stands for.

    ``path`` itself if it holds a checkpoint; for a run directory, the checkpoint of its pointer
    (:func:`latest_checkpoint`; ``ValueError`` if it has none); ``path/checkpoint`` for runs of
    earlier engram versions; for a ``path`` lost by a save that was killed while replacing it, the complete
    copy the save left beside it (with a warning).
    """
    p = Path(path)
    if (p / CONFIG_FILE).exists():
        return p
    if (p / CHECKPOINTS_DIR).is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            steps = sorted((k, q) for q in (p / CHECKPOINTS_DIR).iterdir()
                           if (k := _step_key(q.name)) is not None and q.is_dir() and not q.is_symlink())
            why = "no checkpoint was saved"
            if steps:
                try:
                    verify_checkpoint(steps[-1][1], verify=False)
                    why = f"the newest, {steps[-1][1].name}, is not complete"
                except ValueError as e:
                    why = f"the newest: {e}"
            raise ValueError(f"run directory {str(p)!r} has no complete checkpoint ({why})")
        return latest
    if (p / "checkpoint" / CONFIG_FILE).exists():
        return p / "checkpoint"
    if not p.exists() and p.parent.is_dir():
        # save_checkpoint replaces an existing checkpoint by two renames; a kill between them
        # leaves the new one in .NAME.tmp-PID (complete) or the old one in .NAME.old-PID.
        left = [q for q in p.parent.glob(f".{p.name}.*-*") if q.is_dir() and is_complete(q)]
        left.sort(key=lambda q: (".tmp-" in q.name, q.stat().st_mtime))
        if left:
            warnings.warn(f"{str(p)!r} is missing (a save was interrupted); loading the complete copy "
                          f"{str(left[-1])!r} (rename it to {p.name!r} to keep it)", stacklevel=2)
            return left[-1]
    return p


def _serialisable_config(model: EngramGPT) -> dict[str, Any]:
    d = model.config.to_dict()
    if model.hashing is not None:
        # Pin the resolved raw pad id so the model rebuilds from the stored table alone.
        d["engram"]["pad_id"] = model.hashing.raw_pad_id
        d["engram"]["tokenizer_vocab_size"] = model.hashing.compressed.raw_vocab_size
    return d


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def _free_bytes(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 1e6:,.1f} MB free on its device"
    except OSError:
        return "free space unknown"


def save_checkpoint(path: str | os.PathLike[str], model: EngramGPT, tokenizer: Any,
                    training_state: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                    extra_dirs: dict[str, Path] | None = None) -> Path:
    """Write a checkpoint directory: complete (with its manifest) or not at all.

    Replaces an older checkpoint at ``path``. Raises ``ValueError`` if ``path`` exists, is not
    empty and is not an engram checkpoint, and :class:`CheckpointWriteError` (an ``OSError``) if
    writing fails (disk full, ...): then nothing at ``path`` has changed and no temporary files
    are left.
    """
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import save_model  # noqa: PLC0415

    from engram import __version__  # noqa: PLC0415

    target = Path(path)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not is_checkpoint(target))):
        raise ValueError(f"{str(target)!r} exists and is not an engram checkpoint; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_siblings(target)
    tmp = target.parent / f".{target.name}{_TMP_PREFIX}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
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
        for name, src in (extra_dirs or {}).items():  # written elsewhere (table shards): moved in, then covered by the manifest
            os.replace(src, tmp / name)
        write_manifest(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync(target.parent)
    except (OSError, RuntimeError, SafetensorError) as e:
        # torch.save reports a full disk as RuntimeError("unexpected pos ..."), safetensors as
        # SafetensorError("... No space left on device (os error 28)").
        full = (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "os error 28" in str(e) \
            or ("unexpected pos" in str(e) and _free(target.parent) < 1 << 20)
        raise CheckpointWriteError(
            getattr(e, "errno", None) or errno.EIO,
            f"could not save the checkpoint {str(target)!r}: {'the disk is full' if full else e} "
            f"({_free_bytes(target.parent)}); the previous checkpoint, if any, is intact") from e
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
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {version!r} (written by engram "
            f"{meta.get('engram_version')!r}); this engram reads versions {READABLE_VERSIONS}"
        )
    if not isinstance(meta.get("extra", {}), dict):
        raise ValueError(f"checkpoint {str(path)!r} is corrupt: 'extra' in {CONFIG_FILE} is not an object")
    meta.setdefault("extra", {})
    return meta


def load_checkpoint(path: str | os.PathLike[str], load_training_state: bool = False,
                    map_location: str | torch.device = "cpu", verify: bool = True, tables: str = "full") -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`, or a run directory's latest one
    (:func:`resolve_checkpoint_dir`).

    Tables saved row-sharded by several processes (``tables/``, :mod:`engram.training.shards`) are
    read back whole. ``tables="skip"`` reads no table rows: the tables stay on ``meta`` and the model
    on the CPU, for a caller that loads only its own rows (``engram.distributed.checkpoint``).

    Raises ``ValueError`` for a missing, incomplete, corrupt (files differing from the manifest;
    ``verify=False`` checks sizes only, not SHA-256) or other-version checkpoint and for a
    tokenizer whose compression fingerprint differs from the one the model was trained with.
    """
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_model  # noqa: PLC0415

    root = resolve_checkpoint_dir(path)
    meta = _read_meta(root)
    verify_checkpoint(root, verify)
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
    if tables not in ("full", "skip"):
        raise ValueError(f"tables={tables!r} must be 'full' or 'skip'")
    skip, sharded = tables == "skip", is_sharded(meta)
    model = EngramGPT(gcfg, compressed, table_device="meta" if skip else None)
    table_ids = {id(p) for p in model.table_parameters()}
    table_names = {n for n, p in model.named_parameters() if id(p) in table_ids}
    if model.hashing is not None:
        model.hashing.check_same_as_saved(meta["hashing"], f"checkpoint {str(root)!r}")
    weights = root / WEIGHTS_FILE
    if not weights.exists():
        raise ValueError(f"checkpoint {str(root)!r} is incomplete: no {WEIGHTS_FILE}")
    try:
        if skip:  # the dense weights only: table rows are never read
            from safetensors import safe_open  # noqa: PLC0415

            with safe_open(str(weights), framework="pt") as f:
                dense = {k: f.get_tensor(k) for k in f.keys() if k not in table_names}
            missing, unexpected = model.load_state_dict(dense, strict=False)
        else:
            missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, RuntimeError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {str(root)!r} is corrupt: cannot read {WEIGHTS_FILE} ({e})") from e
    tied = {"lm_head.weight", "wte.weight"} if gcfg.tie_embeddings else set()
    if skip or sharded:  # the tables are not in model.safetensors, or not read from it
        tied |= table_names
    if set(missing) - tied or unexpected:
        raise ValueError(f"checkpoint {str(root)!r} does not match its config: missing {sorted(set(missing) - tied)}, "
                         f"unexpected {sorted(unexpected)}")
    if sharded and not skip:
        load_full_tables(model, root)
    if not skip:
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
        if sharded and not skip:
            fill_full_state(state, model, root)
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
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {str(self.out)!r} cannot be created: {e.strerror or e}") from None
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
