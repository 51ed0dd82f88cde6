"""DeepSeek-V4.1's Engram layers: hashing and weights from its checkpoint (docs/deepseek_v41.md).

Shapes: N rows of one layer's table, d = ``engram_head_dim``, M = ``hc_mult``, D hidden size,
H heads per layer (``(max_ngram_size-1) * engram_n_heads``), E = H * d, B batch, T time.

The config comes from :meth:`engram.config.EngramConfig.from_deepseek_config`; the addressing is
ours (:class:`~engram.core.hashing.NgramHashMapping`, bit for bit V4.1's for the same compression
map), built by :func:`build_hashing`, which checks the tokenizer's compressed vocabulary against
``engram_compressed_vocab_size``. Weights are read from the safetensors shards (V4.1's names; one
layer ``l``, 0-based as ``engram_layer_ids``)::

    layers.{l}.engram.embed.weight   F8_E4M3  (N, d)      the heads' prime tables back to back
    layers.{l}.engram.embed.scale    F8_E8M0  (N, d/32)   one power-of-two exponent per 32 values
    layers.{l}.engram.wkv.weight     F8_E4M3  ((M+1)*D, E)  keys of the M streams, then the value
    layers.{l}.engram.wkv.scale      F8_E8M0  (ceil((M+1)*D/32), ceil(E/32))  32x32 blocks
    layers.{l}.engram.q_weight       float    (M, D)      norm weight on the hidden side
    layers.{l}.engram.k_weight       float    (M, D)      norm weight on the key side

(a bf16/f16/f32 table or ``wkv`` has no ``.scale``). The table is never read whole: every shard is
memory-mapped and a lookup gathers only its rows (:class:`SafetensorsMultiHeadEmbedding`, a
:class:`~engram.nn.memory.TableStorage` on the storage base of :mod:`engram.storage.tables`, so a
hot-row cache and the prefetcher work on it). The other tensors are small and are copied in.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engram.config import EngramConfig, prime_table_sizes
from engram.core.hashing import NgramHashMapping
from engram.nn.module import Engram
from engram.storage.quant import Fp8E8M0BlockCodec, RowCodec
from engram.storage.stores import HostRowStore
from engram.storage.tables import OffloadedMultiHeadEmbedding

#: safetensors dtype names -> torch dtypes (the ones a DeepSeek checkpoint uses, and the plain ones).
SAFETENSORS_DTYPES = {
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
#: V4.1 quantises ``wkv`` in 32x32 blocks and the table rows in 32-value blocks.
FP8_BLOCK = 32
_MAX_HEADER = 100 << 20  # a safetensors header longer than this is corrupt
INDEX_FILE = "model.safetensors.index.json"


def v41_names(layer_id: int) -> dict[str, str]:
    """Checkpoint names of one Engram layer's tensors (V4.1's layout, see the module doc)."""
    p = f"layers.{int(layer_id)}.engram."
    return {"embed": p + "embed.weight", "embed_scale": p + "embed.scale", "wkv": p + "wkv.weight",
            "wkv_scale": p + "wkv.scale", "q_weight": p + "q_weight", "k_weight": p + "k_weight"}


# ====================================================================================== safetensors
@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``file``, absolute byte ``offset``, ``nbytes``; its safetensors
    ``dtype`` name and ``shape``."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its header (8-byte little-endian length, then
    JSON ``{name: {dtype, shape, data_offsets}}``, data after it); nothing else is read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path} is not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ValueError(f"{path} has a corrupt safetensors header ({exc})") from exc
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: the safetensors entry of {name!r} is malformed: {entry!r:.200}") from exc
        torch_dtype = SAFETENSORS_DTYPES.get(dtype)
        if torch_dtype is not None and end - begin != math.prod(shape) * torch_dtype.itemsize:
            raise ValueError(f"{path}: {name!r} spans {end - begin} bytes but is {dtype} {list(shape)}")
        if not 0 <= begin <= end or 8 + n + end > size:
            raise ValueError(f"{path} is truncated: {name!r} ends at byte {8 + n + end}, the file has {size}")
        out[name] = TensorInfo(path, dtype, shape, 8 + n + int(begin), int(end - begin))
    return out


class SafetensorsCheckpoint:
    """The tensors of a safetensors checkpoint: one file, or a directory of shards (listed by
    ``model.safetensors.index.json`` when there is one, else every ``*.safetensors``).

    :meth:`map` gives a tensor that views the file through a read-only memory map (nothing is read
    until it is indexed); :meth:`load` copies a (small) tensor into RAM with ``safetensors``.
    ``config`` is the directory's ``config.json``, parsed (``None`` if absent).
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path
        if path.is_file():
            files, expected = [path], None
        elif (path / INDEX_FILE).is_file():
            weight_map = json.loads((path / INDEX_FILE).read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{path / INDEX_FILE} has no 'weight_map' object")
            expected = {name: path / file for name, file in weight_map.items()}
            files = sorted(set(expected.values()))
        elif path.is_dir():
            files, expected = sorted(path.glob("*.safetensors")), None
        else:
            raise FileNotFoundError(f"no safetensors checkpoint at {path}")
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path}")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{path / INDEX_FILE} names the shard {file.name}, which is missing")
            for name, info in read_safetensors_header(file).items():
                if name in self.tensors:
                    raise ValueError(f"{name!r} is in two shards: {self.tensors[name].file.name} and {file.name}")
                self.tensors[name] = info
        for name, file in (expected or {}).items():
            if name not in self.tensors or self.tensors[name].file != file:
                raise ValueError(f"{path / INDEX_FILE} puts {name!r} in {file.name}, but that shard does not hold it")
        cfg = path / "config.json" if path.is_dir() else None
        self.config: dict[str, Any] | None = json.loads(cfg.read_text()) if cfg is not None and cfg.is_file() else None
        self._maps: dict[Path, tuple[int, mmap.mmap, int]] = {}  # file -> (fd, map, size when mapped)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ValueError(f"the checkpoint {self.path} has no tensor {name!r}") from None

    def _torch_dtype(self, info: TensorInfo, name: str) -> torch.dtype:
        dtype = SAFETENSORS_DTYPES.get(info.dtype)
        if dtype is None:
            raise TypeError(f"{name!r} is {info.dtype}, a dtype this torch ({torch.__version__}) cannot hold")
        return dtype

    def map(self, name: str, as_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``name`` as a tensor over a read-only memory map of its shard (no bytes read yet);
        ``as_dtype`` reinterprets its bytes (same item size, e.g. ``torch.uint8`` for fp8)."""
        info = self.info(name)
        dtype = self._torch_dtype(info, name)
        if info.file not in self._maps:
            fd = os.open(info.file, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            except BaseException:
                os.close(fd)
                raise
            if hasattr(mmap, "MADV_RANDOM"):
                mm.madvise(mmap.MADV_RANDOM)  # hashed rows are random: no readahead per page fault
            self._maps[info.file] = (fd, mm, size)
        mm = self._maps[info.file][1]
        raw = np.frombuffer(mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        with warnings.catch_warnings():  # read-only on purpose
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(raw)  # (nbytes,) uint8, a view of the map
        t = t.view(dtype).view(info.shape)
        if as_dtype is not None and as_dtype != dtype:
            if as_dtype.itemsize != dtype.itemsize:
                raise TypeError(f"cannot view {info.dtype} {name!r} as {as_dtype} (different item size)")
            t = t.view(as_dtype)
        return t

    def load(self, name: str) -> torch.Tensor:
        """A copy of ``name`` in RAM (for the small tensors), read with ``safetensors``."""
        from safetensors import safe_open

        info = self.info(name)
        with safe_open(str(info.file), framework="pt") as f:
            return f.get_tensor(name)

    def check_mapped(self, names: list[str]) -> None:
        """``ValueError`` if a shard holding ``names`` is shorter than when it was mapped (a read
        past its end would kill the process with SIGBUS instead)."""
        for file in {self.info(n).file for n in names}:
            fd, _, size = self._maps[file]
            now = os.lseek(fd, 0, os.SEEK_END)
            if now < size:
                raise ValueError(f"{file} was truncated to {now} bytes while mapped (it had {size}); "
                                 "no rows were read: restore the shard and reopen the checkpoint")

    def close(self) -> None:
        """Unmap and close every shard; tensors from :meth:`map` must not be used afterwards."""
        maps, self._maps = self._maps, {}
        for fd, mm, _ in maps.values():
            try:
                mm.close()
            except BufferError:  # a tensor still views it: the map closes when that is collected
                pass
            os.close(fd)


class SafetensorsRowStore(HostRowStore):
    """A table's parts as views of memory-mapped safetensors tensors (read-only).

    ``names``: part name (the codec's) -> tensor name in ``checkpoint``. Fetches gather only the
    requested rows (``index_select`` on the mapped views: the pages they touch are read).
    """

    def __init__(self, checkpoint: SafetensorsCheckpoint, names: dict[str, str], codec: RowCodec):
        spec = codec.parts()
        if set(names) != set(spec):
            raise ValueError(f"the {codec.name} codec stores parts {sorted(spec)}, got tensors for {sorted(names)}")
        parts = {part: checkpoint.map(names[part], as_dtype=spec[part][0]) for part in spec}
        rows = {p.shape[0] for p in parts.values()}
        for part, (_, cols) in spec.items():
            if parts[part].ndim != 2 or parts[part].shape[1] != cols or len(rows) != 1:
                raise ValueError(f"{names[part]} has shape {list(parts[part].shape)}; the {codec.name} codec needs "
                                 f"({'/'.join(str(r) for r in sorted(rows))}, {cols}) for part {part!r}")
        super().__init__(parts)
        self.checkpoint, self.names = checkpoint, names
        self.num_rows = rows.pop()

    def fetch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        self.checkpoint.check_mapped(list(self.names.values()))
        return super().fetch(rows)

    def put(self, rows: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        raise ValueError(f"the table {sorted(self.names.values())} is read from a safetensors checkpoint and is "
                         "read-only; offload the model to host or disk storage to change rows")


class SafetensorsMultiHeadEmbedding(OffloadedMultiHeadEmbedding):
    """A :class:`~engram.nn.memory.TableStorage` whose rows stay in a memory-mapped safetensors
    checkpoint; outputs (``(B, T, H, d)``, the codec's dtype) are on the ``offsets`` device.

    Args:
        sizes: rows of each head's table (their sum must be the stored row count).
        store: the :class:`SafetensorsRowStore` of the table.
        codec: how rows are stored (:class:`~engram.storage.quant.Fp8E8M0BlockCodec` for V4.1).
        cache_rows, cache_policy, device: as :class:`~engram.storage.tables.HostMultiHeadEmbedding`.
    """

    def __init__(self, sizes: list[int], store: SafetensorsRowStore, codec: RowCodec, cache_rows: int = 0,
                 cache_policy: str = "lru", device: torch.device | str | None = None):
        super().__init__(sizes, codec, cache_rows, cache_policy, device)
        if store.num_rows != self.num_rows:
            raise ValueError(f"{sorted(store.names.values())} hold {store.num_rows} rows but the heads' tables "
                             f"{self.sizes[:4]}{'...' if len(self.sizes) > 4 else ''} add up to {self.num_rows}")
        self.store = store


# ====================================================================================== weights
def dequantize_fp8_blocks(codes: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """fp8 e4m3 ``codes`` ``(O, I)`` with one e8m0 exponent per ``block x block`` tile,
    ``scale`` ``(ceil(O/block), ceil(I/block))`` -> float32 ``(O, I)``: ``code * 2**(b-127)``
    (exact: an e4m3 value times a power of two)."""
    O, I = codes.shape
    if tuple(scale.shape) != (math.ceil(O / block), math.ceil(I / block)):
        raise ValueError(f"an fp8 weight {list(codes.shape)} with {block}x{block} blocks needs scales "
                         f"[{math.ceil(O / block)}, {math.ceil(I / block)}], got {list(scale.shape)}")
    s = scale.to(torch.float32)  # (O/block, I/block): 2**(b-127)
    s = s.repeat_interleave(block, 0)[:O].repeat_interleave(block, 1)[:, :I]  # (O, I)
    return codes.to(torch.float32) * s


def _dense(checkpoint: SafetensorsCheckpoint, name: str, scale_name: str | None, shape: tuple[int, ...],
           dtype: torch.dtype) -> torch.Tensor:
    """A small tensor of the checkpoint in ``dtype``, checked against ``shape``; fp8 is dequantised."""
    info = checkpoint.info(name)
    if info.shape != shape:
        raise ValueError(f"{name} has shape {list(info.shape)}, the config needs {list(shape)}")
    t = checkpoint.load(name)
    if info.dtype == "F8_E4M3":
        if scale_name is None or scale_name not in checkpoint:
            raise ValueError(f"{name} is F8_E4M3 but the checkpoint has no {scale_name or 'scale'} for it")
        t = dequantize_fp8_blocks(t, checkpoint.load(scale_name))
    elif not t.dtype.is_floating_point or t.dtype.itemsize == 1:
        raise TypeError(f"{name} is {info.dtype}; expected a float tensor (or F8_E4M3 with a scale)")
    return t.to(dtype)


def table_sizes(config: EngramConfig, layer_id: int) -> list[int]:
    """Per-head rows of one layer (order-major), the primes the addressing derives."""
    if layer_id not in config.layer_ids:
        raise ValueError(f"layer {layer_id} is not an Engram layer of the config (layer_ids={config.layer_ids})")
    per_order = prime_table_sizes(config.engram_vocab_size, config.n_head_per_ngram, config.layer_ids)[layer_id]
    return [p for order in per_order for p in order]


def open_table(checkpoint: SafetensorsCheckpoint, config: EngramConfig, layer_id: int,
               dtype: torch.dtype = torch.bfloat16, cache_rows: int = 0, cache_policy: str = "lru",
               device: torch.device | str | None = None) -> SafetensorsMultiHeadEmbedding:
    """One layer's table as storage over the mapped checkpoint (rows decoded to ``dtype`` on
    gather; a plain bf16/f16/f32 table is returned in its stored dtype)."""
    names, sizes, d = v41_names(layer_id), table_sizes(config, layer_id), config.head_dim
    info = checkpoint.info(names["embed"])
    if info.shape != (sum(sizes), d):
        raise ValueError(f"{names['embed']} has shape {list(info.shape)}, but layer {layer_id}'s {len(sizes)} prime "
                         f"head tables add up to {sum(sizes)} rows of engram_head_dim={d}")
    if info.dtype == "F8_E4M3":
        codec: RowCodec = Fp8E8M0BlockCodec(d, dtype)
        scale = checkpoint.info(names["embed_scale"])
        if scale.dtype != "F8_E8M0":
            raise ValueError(f"{names['embed_scale']} is {scale.dtype}; V4.1's table scales are F8_E8M0")
        parts = {"codes": names["embed"], "scale": names["embed_scale"]}
    elif info.dtype in ("BF16", "F16", "F32"):
        codec, parts = RowCodec(d, SAFETENSORS_DTYPES[info.dtype]), {"weight": names["embed"]}
    else:
        raise TypeError(f"{names['embed']} is {info.dtype}; expected F8_E4M3 (with an F8_E8M0 scale), BF16, F16 or F32")
    store = SafetensorsRowStore(checkpoint, parts, codec)
    return SafetensorsMultiHeadEmbedding(sizes, store, codec, cache_rows, cache_policy, device)


def load_engram(checkpoint: SafetensorsCheckpoint, config: EngramConfig, layer_id: int,
                dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                cache_rows: int = 0, cache_policy: str = "lru") -> Engram:
    """One V4.1 Engram layer: the table over the mapped checkpoint, ``wkv`` (dequantised exactly)
    and the two norm weights in ``dtype`` on ``device``. ``config`` must be V4.1's form
    (:meth:`EngramConfig.from_deepseek_config`). Nothing is allocated for the table; the dense
    weights are built on "meta" and replaced by the loaded ones."""
    if not config.fused_kv or config.use_short_conv or config.lite or not config.use_gate:
        raise ValueError("load_engram needs V4.1's form (fused_kv=True, use_gate=True, use_short_conv=False, "
                         "lite=False): build the config with EngramConfig.from_deepseek_config")
    if config.value_bias:
        raise ValueError("V4.1's wkv has no bias: value_bias must be False")
    names, sizes = v41_names(layer_id), table_sizes(config, layer_id)
    M, D, E = config.hc_mult, config.hidden_size, config.memory_dim
    engram = Engram(config, layer_id, sizes, device="meta")
    engram.memory = open_table(checkpoint, config, layer_id, dtype, cache_rows, cache_policy, device)
    wkv = _dense(checkpoint, names["wkv"], names["wkv_scale"], ((M + 1) * D, E), dtype)  # ((M+1)*D, E)
    engram.wkv.weight = nn.Parameter(wkv.to(device))
    engram.query_norm_weight = nn.Parameter(_dense(checkpoint, names["q_weight"], None, (M, D), dtype).to(device))
    engram.key_norm_weight = nn.Parameter(_dense(checkpoint, names["k_weight"], None, (M, D), dtype).to(device))
    left = [n for n, t in list(engram.named_parameters()) + list(engram.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"load_engram left {left} unloaded (an Engram parameter V4.1's layout does not name)")
    return engram


# ====================================================================================== hashing
def build_hashing(config: EngramConfig, tokenizer: Any) -> NgramHashMapping:
    """V4.1's addressing: our :class:`NgramHashMapping` with the multipliers drawn for
    ``config.compressed_vocab_size``, after checking the tokenizer compresses to exactly that many
    ids (otherwise every n-gram would land in other rows)."""
    return NgramHashMapping(config, tokenizer)  # it checks the tokenizer against compressed_vocab_size


def hash_with_images(hashing: NgramHashMapping, input_ids: torch.Tensor, image_token_id: int | None,
                     history: torch.Tensor | None = None,
                     doc_starts: torch.Tensor | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """V4.1's multimodal rule on top of the hash: an image token, and every older token its
    n-grams reach, read as the pad id.

    At an image token at position j the n-gram window of every t >= j sees pad at j and before,
    i.e. the image token's id becomes the pad id and a document starts at j (``doc_starts``,
    which already resets the history to pad before a start). Returns ``({layer: (B, T, H)}, next
    history (B, N-1))``; ``history`` (B, N-1) compressed ids precede ``input_ids`` (B, T).
    """
    comp = hashing.compress(input_ids)  # (B, T)
    if history is not None:
        history = history[:, history.shape[1] - hashing.history_len :]  # the last N-1
    starts = None if doc_starts is None else hashing._check_starts(doc_starts, input_ids)
    if image_token_id is not None:
        image = input_ids == int(image_token_id)  # (B, T)
        comp = torch.where(image, hashing.pad_id, comp)
        starts = image if starts is None else starts | image
    return hashing.hash_compressed(comp, history, doc_starts=starts), hashing.next_history(history, comp, starts)


# ====================================================================================== all of it
@dataclass
class DeepSeekEngrams:
    """A V4.1 checkpoint's Engram layers: ``config``, ``hashing`` and ``layers`` ``{layer_id:
    Engram}``; ``checkpoint`` keeps the shards mapped (close it when done)."""

    config: EngramConfig
    hashing: NgramHashMapping
    layers: dict[int, Engram] = field(default_factory=dict)
    checkpoint: SafetensorsCheckpoint | None = None


def load_deepseek_engrams(path: str | os.PathLike, tokenizer: Any, dtype: torch.dtype = torch.bfloat16,
                          device: torch.device | str | None = None, cache_rows: int = 0,
                          config: dict[str, Any] | None = None) -> DeepSeekEngrams:
    """Every Engram layer of the DeepSeek checkpoint directory ``path`` (its ``config.json``, or
    ``config`` given as a dict), tables memory-mapped, with the hashing for ``tokenizer``.

    Run a layer as V4.1 does: ``hidden = layers[l](hidden, hash_ids[l], residual=True)`` with
    ``hidden`` ``(B, T, M, D)`` before block ``l`` and ``hash_ids`` from ``hashing.hash(ids)``
    (or :func:`hash_with_images`).
    """
    checkpoint = SafetensorsCheckpoint(path)
    raw = config if config is not None else checkpoint.config
    if raw is None:
        raise FileNotFoundError(f"{path} has no config.json; pass config= (the parsed DeepSeek config dict)")
    cfg = EngramConfig.from_deepseek_config(raw)
    hashing = build_hashing(cfg, tokenizer)
    layers = {lid: load_engram(checkpoint, cfg, lid, dtype, device, cache_rows) for lid in cfg.layer_ids}
    return DeepSeekEngrams(cfg, hashing, layers, checkpoint)
