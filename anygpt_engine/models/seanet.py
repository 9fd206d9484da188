"""SEANet's building blocks, shared by SpeechTokenizer and EnCodec (one family of conv codecs):
convs padded so that N samples give ceil(N / stride) frames, transposed convs trimmed back to
frames * stride samples, and an LSTM with a skip connection. Weights are plain tensors (weight
norm is folded in by the loaders).

Padding: a conv of effective kernel k_eff = (kernel - 1) * dilation + 1 pads k_eff - stride in
total, all on the left when causal, else split with the extra one on the left; then the right
gets (-N) mod stride more so the last stride window is whole. Reflect padding also works on
inputs shorter than itself (zeros are appended first and cut off again), as both upstream
packages do it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def pad1d(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    if mode != "reflect":
        return F.pad(x, (left, right), mode)
    extra = max(0, max(left, right) - x.shape[-1] + 1)
    padded = F.pad(F.pad(x, (0, extra)), (left, right), mode)
    return padded[..., :padded.shape[-1] - extra]


class Conv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, *, causal: bool = False,
                 pad_mode: str = "reflect", **kw):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, **kw))
        self.bias = nn.Parameter(torch.empty(cout, **kw))
        self.stride, self.dilation, self.causal, self.pad_mode = stride, dilation, causal, pad_mode
        self.padding = (kernel - 1) * dilation + 1 - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = (-x.shape[-1]) % self.stride  # right padding up to a whole last frame
        if self.causal:
            x = pad1d(x, self.padding, extra, self.pad_mode)
        else:
            right = self.padding // 2
            x = pad1d(x, self.padding - right, right + extra, self.pad_mode)
        return F.conv1d(x, self.weight, self.bias, self.stride, dilation=self.dilation)


class ConvTranspose(nn.Module):
    """Trims kernel - stride samples: split (the odd one on the left) when not causal; when
    causal, ceil(trim_right_ratio * that) on the right and the rest on the left."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, *, causal: bool = False,
                 trim_right_ratio: float = 1.0, **kw):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cin, cout, kernel, **kw))
        self.bias = nn.Parameter(torch.empty(cout, **kw))
        self.stride = stride
        padding = kernel - stride
        self.trim_right = math.ceil(padding * trim_right_ratio) if causal else padding // 2
        self.trim_left = padding - self.trim_right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose1d(x, self.weight, self.bias, self.stride)
        return y[..., self.trim_left:y.shape[-1] - self.trim_right]


class LSTM(nn.Module):
    """LSTM over frames plus a skip connection (the input repeated for a bidirectional one, whose
    output is twice as wide); [B, C, T] in and out."""

    def __init__(self, dim: int, layers: int, bidirectional: bool = False, **kw):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, layers, bidirectional=bidirectional, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(2, 0, 1)  # [T, B, C]
        y = self.lstm(x)[0]
        if self.lstm.bidirectional:
            x = x.repeat(1, 1, 2)
        return (y + x).permute(1, 2, 0)


class ELU(nn.Module):
    """A layer of its own so layer indices (and so checkpoint names) match the upstream lists."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x)
