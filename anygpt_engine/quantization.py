"""Weight-only quantization of the backbone's matrices: int8, fp8 (e4m3) and int4, made at load
from the 16-bit weights and kept quantized on every device (the CPU included).

Formats, for a weight W [N, K] (rows are output channels):

  int8  qweight int8 [N, K]; scales float32 [N]. Symmetric: scale = absmax(row) / 127,
        q = clamp(round(w / scale), -127, 127).
  fp8   qweight float8_e4m3fn [N, K]; scales float32 [N]. scale = absmax(row) / 448 (e4m3's
        largest finite value), q = e4m3(w / scale) rounded to nearest.
  int4  qweight uint8 [N, K / 2]: element 2j in the low nibble, 2j + 1 in the high one;
        scales float16 [N, K / 128], zeros uint8 [N, K / 128] (values 0..15), one pair per group
        of 128 along K. Asymmetric over the group's range widened to hold 0:
        scale = (max - min) / 15 rounded up to float16, zero = round(-min / scale),
        q = clamp(round(w / scale) + zero, 0, 15).

Dequantized values, the contract every face of ops.linear computes with (exact in float32):
  int8, fp8: w = float(q) * scale[n];   int4: w = (float(q) - float(zero[n, g])) * float(scale[n, g]).
Error bounds per element: int8 |w - deq| <= scale / 2; int4 <= scale / 2 (the float16 scale is
rounded up, so the group's range still fits in 0..15); fp8 <= |w| / 16 + scale * 2^-10
(3 mantissa bits; the subnormal step is 2^-9).

Kernels dequantize tile by tile in registers (ops/gemv.py): a dequantized copy of a matrix is
never kept. The embedding and the LM head stay 16-bit.
"""

from __future__ import annotations

import torch
from torch import nn

MODES = ("int8", "fp8", "int4")
INT4_GROUP = 128
FP8_MAX = 448.0
_ROWS_PER_CHUNK = 4096  # rows quantized (or dequantized by the reference) at a time: bounded scratch memory


def check_mode(quantization) -> str | None:
    """None or one of MODES; anything else is a ValueError naming the argument."""
    if quantization is None or quantization in MODES:
        return quantization
    raise ValueError(f"quantization={quantization!r}, expected None or one of {list(MODES)}")


class QuantizedWeight(nn.Module):
    """A quantized [N, K] weight: the packed values and their scales (and int4 zero points) as
    buffers, so the container moves with its model (.to(device)) like the 16-bit matrix did."""

    def __init__(self, mode: str, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 shape: tuple[int, int]):
        super().__init__()
        self.mode = check_mode(mode)
        if self.mode is None:
            raise ValueError("mode=None: a QuantizedWeight needs one of " + str(list(MODES)))
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.out_features, self.in_features = int(shape[0]), int(shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def group_size(self) -> int | None:
        return INT4_GROUP if self.mode == "int4" else None

    @property
    def nbytes(self) -> int:
        """Bytes a GEMV reads: packed values, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def rows(self, start: int, end: int) -> "QuantizedWeight":
        """Output rows [start, end) as views of this weight's buffers (a stacked matrix's parts)."""
        if not 0 <= start <= end <= self.out_features:
            raise ValueError(f"rows [{start}, {end}) outside the weight's {self.out_features} rows")
        zeros = None if self.zeros is None else self.zeros[start:end]
        return QuantizedWeight(self.mode, self.qweight[start:end], self.scales[start:end], zeros,
                               (end - start, self.in_features))

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """float32 rows [start, end) of the dequantized matrix (for references and tests; the
        kernels never materialize it)."""
        end = self.out_features if end is None else end
        q = self.qweight[start:end]
        if self.mode != "int4":
            return q.float() * self.scales[start:end, None]
        values = torch.stack((q & 0xF, q >> 4), dim=-1).view(end - start, -1, INT4_GROUP).float()
        zeros = self.zeros[start:end, :, None].float()
        return ((values - zeros) * self.scales[start:end, :, None].float()).view(end - start, self.in_features)

    def extra_repr(self) -> str:
        return f"{self.mode}, out_features={self.out_features}, in_features={self.in_features}"


def quantize(weight: torch.Tensor, mode: str) -> QuantizedWeight:
    """The quantized form of a 2-D floating-point weight [N, K] (see the module docstring)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating-point tensor, got {getattr(weight, 'shape', type(weight))}")
    if check_mode(mode) is None:
        raise ValueError("mode=None: nothing to quantize")
    n, k = weight.shape
    if mode == "int4" and k % INT4_GROUP:
        raise ValueError(f"weight.shape[1]={k} (K) is not a multiple of the int4 group size {INT4_GROUP}")
    if mode == "int4" and k % 2:
        raise ValueError(f"weight.shape[1]={k} (K) must be even to pack two int4 values per byte")
    parts = [_quantize_rows(weight[i:i + _ROWS_PER_CHUNK].float(), mode)
             for i in range(0, n, _ROWS_PER_CHUNK)]
    qweight, scales, zeros = (None if parts[0][j] is None else torch.cat([p[j] for p in parts]) for j in range(3))
    return QuantizedWeight(mode, qweight, scales, zeros, (n, k))


def _quantize_rows(w: torch.Tensor, mode: str):
    if not torch.isfinite(w).all():
        raise ValueError(f"cannot quantize a weight with inf or NaN values to {mode}")
    if mode in ("int8", "fp8"):
        top = 127.0 if mode == "int8" else FP8_MAX
        scale = w.abs().amax(dim=1) / top
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale works
        scaled = (w / scale[:, None]).clamp(-top, top)
        if mode == "int8":
            return scaled.round().to(torch.int8), scale, None
        return scaled.to(torch.float8_e4m3fn), scale, None
    groups = w.view(w.shape[0], -1, INT4_GROUP)
    low = groups.amin(dim=2).clamp(max=0.0)
    high = groups.amax(dim=2).clamp(min=0.0)
    exact = (high - low) / 15
    scale = exact.to(torch.float16)
    # Round the float16 scale up (the next float16 has the next bit pattern): the range fits in 0..15.
    scale = torch.where(scale.float() < exact, (scale.view(torch.int16) + 1).view(torch.float16), scale)
    if torch.isinf(scale).any():
        raise ValueError(f"int4 scales overflow float16: a group of the weight spans {float((high - low).max()):.4g}")
    scale = torch.where(exact > 0, scale, torch.ones_like(scale))  # an all-zero group
    s = scale.float()[:, :, None]
    zero = (-low / scale.float()).round().clamp(0, 15)
    q = ((groups / s).round() + zero[:, :, None]).clamp(0, 15).to(torch.uint8).view(w.shape[0], -1)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scale, zero.to(torch.uint8)


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of every QuantizedWeight inside `module`."""
    return sum(m.nbytes for m in module.modules() if isinstance(m, QuantizedWeight))
