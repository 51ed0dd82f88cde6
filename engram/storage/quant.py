"""Row codecs for Engram tables: plain, int8 with a per-row scale, fp8 e4m3 with block scales.

Shapes: N rows, d row width, G = d // block scale blocks per row (fp8).

A codec turns rows ``(N, d)`` into named parts (each ``(N, ...)``, one entry per row, so a row
is fetched by indexing every part with the same row ids) and back. Storage (``engram.offload``)
keeps the parts wherever the table lives and decodes only the gathered rows ("dequantised on
gather"), so memory and transfer shrink with the code size.

Error (elementwise, per row of the original ``w``):
- int8: ``|w - deq(w)| <= amax_row / 254`` (round to nearest of 255 levels).
- fp8 e4m3: ``|w - deq(w)| <= |w| / 16 + amax_block / 448 * 2**-9`` (3 mantissa bits; the
  second term covers subnormals).
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


def make_codec(quantize: str | None, dim: int, dtype: torch.dtype = torch.float32, block: int = 32) -> RowCodec:
    """Codec for ``quantize`` in ``None | "int8" | "fp8"``; ``dtype`` is what gathers return."""
    if quantize is None or quantize == "none":
        return RowCodec(dim, dtype)
    if quantize == "int8":
        return Int8RowCodec(dim, dtype)
    if quantize == "fp8":
        return Fp8BlockCodec(dim, dtype, block)
    raise ValueError(f"quantize must be None, 'int8' or 'fp8', got {quantize!r}")


def fake_quantize(w: torch.Tensor, quantize: str | None) -> torch.Tensor:
    """``decode(encode(w))``: what a table ``(N, d)`` reads back as after quantisation."""
    codec = make_codec(quantize, w.shape[1], w.dtype)
    return codec.decode(codec.encode(w))
