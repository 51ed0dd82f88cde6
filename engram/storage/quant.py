"""Row codecs for Engram tables: plain, int8 with a per-row scale, fp8 e4m3 with block scales
(float32 scales, or DeepSeek-V4.1's power-of-two e8m0 scales).

Shapes: N rows, d row width, G = d // block scale blocks per row (fp8).

A codec turns rows ``(N, d)`` into named parts (each ``(N, ...)``, one entry per row, so a row
is fetched by indexing every part with the same row ids) and back. Storage (``engram.offload``)
keeps the parts wherever the table lives and decodes only the gathered rows ("dequantised on
gather"), so memory and transfer shrink with the code size.

Error (elementwise, per row of the original ``w``):
- int8: ``|w - deq(w)| <= amax_row / 254`` (round to nearest of 255 levels).
- fp8 e4m3: ``|w - deq(w)| <= |w| / 16 + amax_block / 448 * 2**-9`` (3 mantissa bits; the
  second term covers subnormals).
- fp8 e4m3 + e8m0: ``|w - deq(w)| <= |w| / 16 + 2 * amax_block / 448 * 2**-9`` (the scale is
  rounded up to a power of two, so at most twice the float32 one).
"""

from __future__ import annotations

import torch

#: name -> (dtype, elements per row) of every stored part.
PartSpec = dict[str, tuple[torch.dtype, int]]


class RowCodec:
    """Plain rows: stored as they are in ``dtype`` (the identity codec)."""

    name = "none"

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim, self.dtype = dim, dtype

    def parts(self) -> PartSpec:
        """Stored parts and their per-row element counts."""
        return {"weight": (self.dtype, self.dim)}

    def row_bytes(self) -> int:
        """Bytes one stored row takes (all parts)."""
        return sum(dt.itemsize * n for dt, n in self.parts().values())

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``(N, d)`` -> parts ``{name: (N, n)}`` (CPU, contiguous)."""
        return {"weight": w.detach().to("cpu", self.dtype).contiguous()}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Parts of gathered rows -> rows ``(N, d)`` in the codec's ``dtype``."""
        return parts["weight"]

    def config(self) -> dict:
        """What a table file records to check a reader uses the same codec."""
        return {"codec": self.name, "dtype": str(self.dtype).removeprefix("torch.")}


class Int8RowCodec(RowCodec):
    """int8 codes with one float32 scale per row: ``w ~= codes * scale``, ``scale = amax / 127``."""

    name = "int8"

    def parts(self) -> PartSpec:
        return {"codes": (torch.int8, self.dim), "scale": (torch.float32, 1)}

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = w.detach().to("cpu", torch.float32)  # (N, d)
        scale = w.abs().amax(dim=1, keepdim=True) / 127.0  # (N, 1)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: codes 0, scale 0
        codes = torch.round(w / safe).clamp_(-127, 127).to(torch.int8)  # (N, d)
        return {"codes": codes.contiguous(), "scale": scale.contiguous()}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return (parts["codes"].to(torch.float32) * parts["scale"]).to(self.dtype)  # (N, d)


class Fp8BlockCodec(RowCodec):
    """fp8 e4m3 codes with one float32 scale per block of ``block`` elements of a row.

    ``scale = amax_block / 448`` (448 is e4m3's largest finite value). Codes are stored as
    ``uint8`` bytes so numpy memory maps can hold them.
    """

    name = "fp8"
    FP8_MAX = 448.0

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, block: int = 32):
        super().__init__(dim, dtype)
        if not hasattr(torch, "float8_e4m3fn"):
            raise TypeError(f"quantize='fp8' needs torch.float8_e4m3fn, missing in torch {torch.__version__}")
        block = min(int(block), dim)
        if dim % block:
            raise ValueError(f"fp8 block size {block} must divide the row width dim={dim}")
        self.block = block

    def parts(self) -> PartSpec:
        return {"codes": (torch.uint8, self.dim), "scale": (torch.float32, self.dim // self.block)}

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        N = w.shape[0]
        w = w.detach().to("cpu", torch.float32).view(N, -1, self.block)  # (N, G, block)
        scale = w.abs().amax(dim=2, keepdim=True) / self.FP8_MAX  # (N, G, 1)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (w / safe).clamp_(-self.FP8_MAX, self.FP8_MAX).to(torch.float8_e4m3fn)  # (N, G, block)
        return {"codes": codes.view(torch.uint8).reshape(N, self.dim).contiguous(),
                "scale": scale.reshape(N, -1).contiguous()}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        codes = parts["codes"]
        N = codes.shape[0]
        vals = codes.view(torch.float8_e4m3fn).to(torch.float32).view(N, -1, self.block)  # (N, G, block)
        return (vals * parts["scale"].unsqueeze(-1)).reshape(N, self.dim).to(self.dtype)  # (N, d)

    def config(self) -> dict:
        return {**super().config(), "block": self.block}


class Fp8E8M0BlockCodec(RowCodec):
    """fp8 e4m3 codes with one e8m0 exponent per block of 32 values: DeepSeek-V4.1's Engram rows.

    A 256-wide row is 256 code bytes + 8 exponent bytes = 264 bytes (the float32-scale
    :class:`Fp8BlockCodec` takes 288). Parts, both ``uint8``: ``codes`` ``(N, d)``, the e4m3 bits,
    and ``scale`` ``(N, d/32)``, the e8m0 bits ``b`` (``torch.float8_e8m0fnu``: ``2**(b-127)``;
    255 is NaN). Decoding is V4.1's: ``(float32(code) * 2**(b-127)).to(dtype)``, so rows read
    from a V4.1 checkpoint decode bit for bit as V4.1's serving code decodes them.

    Encoding (for tables quantised here): ``scale = 2**ceil(log2(amax_block / 448))``, the smallest
    power of two that keeps every ``w / scale`` within e4m3's range (DeepSeek's ue8m0 rule);
    an all-zero block gets ``b = 127`` (scale 1). Decoding then re-encoding a V4.1 row gives back
    the same values: its codes are only ever scaled up by a power of two, which e4m3 holds exactly.
    """

    name = "fp8_e8m0"
    FP8_MAX = 448.0
    BLOCK = 32

    def __init__(self, dim: int, dtype: torch.dtype = torch.bfloat16):
        super().__init__(dim, dtype)
        if not (hasattr(torch, "float8_e4m3fn") and hasattr(torch, "float8_e8m0fnu")):
            raise TypeError(f"e8m0-scaled fp8 rows need torch.float8_e4m3fn and torch.float8_e8m0fnu, missing in "
                            f"torch {torch.__version__}")
        if dim % self.BLOCK:
            raise ValueError(f"e8m0-scaled fp8 rows have one exponent per {self.BLOCK} values: the row width "
                             f"dim={dim} must be a multiple of {self.BLOCK}")

    def parts(self) -> PartSpec:
        return {"codes": (torch.uint8, self.dim), "scale": (torch.uint8, self.dim // self.BLOCK)}

    def encode(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        N = w.shape[0]
        w = w.detach().to("cpu", torch.float32).view(N, -1, self.BLOCK)  # (N, G, 32)
        ratio = w.abs().amax(dim=2, keepdim=True) / self.FP8_MAX  # (N, G, 1)
        mant, exp = torch.frexp(ratio)  # ratio = mant * 2**exp, mant in [0.5, 1)
        e = torch.where(mant == 0.5, exp - 1, exp)  # ceil(log2(ratio)): exact, no log2 rounding
        e = torch.where(ratio > 0, e, torch.zeros_like(e)).clamp_(-127, 127)  # (N, G, 1)
        scale = torch.ldexp(torch.ones_like(ratio), e)  # 2**e, exact
        codes = (w / scale).clamp_(-self.FP8_MAX, self.FP8_MAX).to(torch.float8_e4m3fn)  # (N, G, 32)
        return {"codes": codes.view(torch.uint8).reshape(N, self.dim).contiguous(),
                "scale": (e + 127).to(torch.uint8).reshape(N, -1).contiguous()}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        codes = parts["codes"]
        N = codes.shape[0]
        vals = codes.view(torch.float8_e4m3fn).to(torch.float32).view(N, -1, self.BLOCK)  # (N, G, 32)
        scale = parts["scale"].view(torch.float8_e8m0fnu).to(torch.float32)  # (N, G): 2**(b-127)
        return (vals * scale.unsqueeze(-1)).reshape(N, self.dim).to(self.dtype)  # (N, d)


def make_codec(quantize: str | None, dim: int, dtype: torch.dtype = torch.float32, block: int = 32) -> RowCodec:
    """Codec for ``quantize`` in ``None | "int8" | "fp8" | "fp8_e8m0"``; ``dtype`` is what gathers
    return (``"fp8_e8m0"``: DeepSeek-V4.1's rows, one power-of-two exponent per 32 values)."""
    if quantize is None or quantize == "none":
        return RowCodec(dim, dtype)
    if quantize == "int8":
        return Int8RowCodec(dim, dtype)
    if quantize == "fp8":
        return Fp8BlockCodec(dim, dtype, block)
    if quantize == "fp8_e8m0":
        return Fp8E8M0BlockCodec(dim, dtype)
    raise ValueError(f"quantize must be None, 'int8', 'fp8' or 'fp8_e8m0', got {quantize!r}")


def fake_quantize(w: torch.Tensor, quantize: str | None) -> torch.Tensor:
    """``decode(encode(w))``: what a table ``(N, d)`` reads back as after quantisation."""
    codec = make_codec(quantize, w.shape[1], w.dtype)
    return codec.decode(codec.encode(w))
