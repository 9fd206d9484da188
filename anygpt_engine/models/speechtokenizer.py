"""SpeechTokenizer (Zhang et al. 2023), the speech codec AnyGPT reads and writes: a SEANet
encoder ending in a bidirectional LSTM, 8 RVQ levels of 1024 codes over 1024-d frames at 50 Hz
(16 kHz audio, hop 320), and a SEANet decoder. Level 1 carries the semantic content the LLM sees;
levels 2..8 the acoustic detail that SoundStorm fills in.

The RVQ runs on the engine's ops (ops.rvq_encode / ops.rvq_decode), so codes are the float32
reference's. The networks are plain torch modules. Weights load from the published pair
(config.json + SpeechTokenizer.pt, a state dict of the `speechtokenizer` package's module):
weight norm is folded into plain conv weights at load, either spelling (`weight_g`/`weight_v`
or `parametrizations.weight.original0/1`).

The layers are SEANet's (models/seanet.py, shared with EnCodec): non-causal, reflect padding, so
T = ceil(samples / 320) frames and decode gives 320 samples per frame.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from anygpt_engine.models.seanet import ELU, LSTM, Conv, ConvTranspose


@dataclass(frozen=True)
class SpeechTokenizerConfig:
    n_filters: int = 64
    dimension: int = 1024
    strides: tuple[int, ...] = (8, 5, 4, 2)
    lstm_layers: int = 2
    bidirectional: bool = True  # the encoder's LSTM; the decoder's is always unidirectional
    dilation_base: int = 2
    residual_kernel_size: int = 3
    n_residual_layers: int = 1
    activation: str = "ELU"
    sample_rate: int = 16000
    n_q: int = 8
    codebook_size: int = 1024
    semantic_dimension: int = 768  # the distillation head's width (training only; not loaded)

    def __post_init__(self):
        object.__setattr__(self, "strides", tuple(self.strides))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"SpeechTokenizerConfig.{f.name}={value!r}, expected a positive int")
        if not self.strides or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.strides):
            raise ValueError(f"SpeechTokenizerConfig.strides={self.strides!r}, expected positive ints")
        if self.activation != "ELU":
            raise ValueError(f"SpeechTokenizerConfig.activation={self.activation!r}: only 'ELU' (what the published "
                             "checkpoints use) is supported")

    @property
    def hop_length(self) -> int:
        return math.prod(self.strides)

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "SpeechTokenizerConfig":
        """The package's config.json (training keys it also holds are ignored)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no SpeechTokenizer config at {path}")
        raw = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        kwargs = {k: (tuple(v) if k == "strides" else v) for k, v in raw.items() if k in known}
        return cls(**kwargs)


class ResidualBlock(nn.Module):
    """ELU -> conv k (dilated) to dim/2 -> ELU -> conv 1 back to dim, plus a 1x1-conv shortcut."""

    def __init__(self, dim: int, kernel: int, dilation: int):
        super().__init__()
        hidden = dim // 2
        self.block = nn.Sequential(ELU(), Conv(dim, hidden, kernel, dilation=dilation), ELU(), Conv(hidden, dim, 1))
        self.shortcut = Conv(dim, dim, 1)

    def forward(self, x):
        return self.shortcut(x) + self.block(x)


def _encoder_layers(c: SpeechTokenizerConfig) -> list[nn.Module]:
    width = c.n_filters
    layers: list[nn.Module] = [Conv(1, width, 7)]
    for ratio in reversed(c.strides):
        layers += [ResidualBlock(width, c.residual_kernel_size, c.dilation_base ** j)
                   for j in range(c.n_residual_layers)]
        layers += [ELU(), Conv(width, width * 2, ratio * 2, stride=ratio)]
        width *= 2
    layers.append(LSTM(width, c.lstm_layers, c.bidirectional))
    width *= 2 if c.bidirectional else 1
    return layers + [ELU(), Conv(width, c.dimension, 7)]


def _decoder_layers(c: SpeechTokenizerConfig) -> list[nn.Module]:
    width = c.n_filters * 2 ** len(c.strides)
    layers: list[nn.Module] = [Conv(c.dimension, width, 7), LSTM(width, c.lstm_layers)]
    for ratio in c.strides:
        layers += [ELU(), ConvTranspose(width, width // 2, ratio * 2, ratio)]
        layers += [ResidualBlock(width // 2, c.residual_kernel_size, c.dilation_base ** j)
                   for j in range(c.n_residual_layers)]
        width //= 2
    return layers + [ELU(), Conv(c.n_filters, 1, 7)]


class SpeechTokenizerNet(nn.Module):
    """The two SEANet halves. encoder: wav [B, 1, S] -> frames [B, D, ceil(S / hop)];
    decoder: frames [B, D, T] -> wav [B, 1, T * hop]. The codebooks live with the facade."""

    def __init__(self, config: SpeechTokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = nn.Sequential(*_encoder_layers(config))
        self.decoder = nn.Sequential(*_decoder_layers(config))

    def init_random(self, seed: int = 0) -> None:
        """Deterministic random weights (drawn on the CPU): N(0, 1/fan_in) conv and LSTM matrices,
        zero biases. For benchmarks and tests without a checkpoint."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias") or ".bias_" in name:
                    p.zero_()
                else:
                    fan_in = p.shape[1] * (p.shape[2] if p.dim() == 3 else 1)
                    p.copy_(torch.randn(p.shape, generator=generator) * fan_in ** -0.5)


# -- checkpoint names ----------------------------------------------------------------------------
# The package nests each conv as SConv1d.conv (NormConv1d).conv (nn.Conv1d) and each transposed
# conv as .convtr.convtr, under encoder.model.{i} / decoder.model.{i}; the layer indices are the
# same here.
_NESTING = re.compile(r"\.(conv\.conv|convtr\.convtr)\.")
_UNUSED = re.compile(r"^(transform\.|quantizer\.vq\.layers\.\d+\._codebook\.(inited|cluster_size|embed_avg)$)")


def fold_weight_norm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replaces every weight-norm pair (g, v) by w = g * v / ||v||, the norm over all dims but 0
    (torch's weight_norm default), under the plain `.weight` name. Other tensors pass through."""
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    spellings = {"weight_g": "g", "weight_v": "v", "parametrizations.weight.original0": "g",
                 "parametrizations.weight.original1": "v"}
    for key, value in state.items():
        for suffix, part in spellings.items():
            if key.endswith("." + suffix):
                pairs.setdefault(key[: -len(suffix)] + "weight", {})[part] = value
                break
        else:
            out[key] = value
    for name, pair in pairs.items():
        if set(pair) != {"g", "v"}:
            raise ValueError(f"weight-norm parameters of {name} are incomplete: found only {sorted(pair)}")
        out[name] = torch._weight_norm(pair["v"].float(), pair["g"].float(), 0)  # what weight norm evaluates
    return out


def load_network(net: SpeechTokenizerNet, state: Mapping[str, torch.Tensor]) -> None:
    """Copies the package's encoder/decoder tensors into `net`; raises ValueError listing missing,
    unexpected and mis-shaped tensors. Quantizer buffers and the training-only `transform` head are
    not the network's (the codebooks are read separately)."""
    params = dict(net.named_parameters())
    filled, unexpected, misshaped = set(), [], []
    with torch.no_grad():
        for key, value in fold_weight_norm(state).items():
            if _UNUSED.match(key) or key.startswith("quantizer."):
                continue
            name = _NESTING.sub(".", key).replace(".model.", ".", 1)
            if name not in params:
                unexpected.append(key)
                continue
            if tuple(value.shape) != tuple(params[name].shape):
                misshaped.append(f"{key} {tuple(value.shape)} (expected {tuple(params[name].shape)})")
                continue
            params[name].copy_(value)
            filled.add(name)
    missing = sorted(set(params) - filled)
    if missing or unexpected or misshaped:
        def listing(names):
            return f"{len(names)} ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" if names else "none"

        raise ValueError(f"SpeechTokenizer checkpoint does not match its config: missing {listing(missing)}; "
                         f"unexpected {listing(unexpected)}; wrong shape {listing(misshaped)}")
