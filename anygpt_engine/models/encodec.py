"""EnCodec, AnyGPT's music codec (facebook/encodec_32khz, 4 codebooks x 2048) and its general-audio
codec (facebook/encodec_24khz, 4 of its 32 codebooks x 1024). Readable in one sitting.

The network follows transformers' EncodecModel (the format both checkpoints are published in);
F = num_filters, R = len(upsampling_ratios), W = F * 2^R:
  encoder  conv(1 -> F, k=kernel_size)
           per ratio r in reversed(upsampling_ratios), channels C = F, 2F, 4F, ...:
             resnet block(C), ELU, conv(C -> 2C, k=2r, stride r)
           LSTM(W, num_lstm_layers) + skip, ELU, conv(W -> hidden, k=last_kernel_size)
  RVQ      frames [T, hidden] -> codes [L, T] on the engine's kernels (ops.rvq_encode / rvq_decode)
  decoder  conv(hidden -> W, k=kernel_size), LSTM + skip
           per ratio r in upsampling_ratios: ELU, transposed conv(C -> C/2, k=2r, stride r), resnet block(C/2)
           ELU, conv(F -> 1, k=last_kernel_size)
  resnet block(C), the j-th of num_residual_layers:
           shortcut(x) + conv(C/c -> C, k=1)(ELU(conv(C -> C/c, k=residual_kernel_size,
                                                   dilation=dilation_growth_rate^j)(ELU(x))))
           with c = compress; shortcut is a 1x1 conv, or the identity when use_conv_shortcut is
           false (encodec_32khz).
Every conv pads itself so N samples give ceil(N / stride) frames: P = (kernel - 1) * dilation + 1
- stride samples of `pad_mode` padding (reflect), split in two (non-causal; the right side gets
floor(P / 2)) or all on the left (causal), plus right padding up to a whole last stride.
Transposed convs trim P = kernel - stride samples the same way (causal: ceil(P *
trim_right_ratio) on the right). So N samples give ceil(N / hop) frames, and T frames decode to
T * hop samples.

Weights are stored weight-normed (w = g * v / ||v||, the norm over all dims but 0). The loader
folds each (g, v) pair into one plain conv weight with torch._weight_norm, the very function
torch's weight_norm parametrization evaluates, so the weights are bit-identical to transformers'.
It reads transformers' parameter names in either spelling of the pair: `conv.weight_g` /
`conv.weight_v` (the published files) or `conv.parametrizations.weight.original0` / `original1`
(what transformers >= 4.41 saves).

Not supported (rejected with the config field named): the 48 kHz model's `normalize` (per-chunk
RMS scaling), chunked encoding (`chunk_length_s`), `time_group_norm`, and stereo
(`audio_channels` 2). AnyGPT uses none of them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anygpt_engine.models.seanet import ELU, LSTM, Conv, ConvTranspose
from anygpt_engine.ops.rvq import RVQCodebooks

ANYGPT_LEVELS = 4  # AnyGPT codes both models at 4 codebooks (32 kHz: 2.2 kbps; 24 kHz: 3.0 kbps)


@dataclass(frozen=True)
class EncodecConfig:
    """transformers' EncodecConfig fields that shape the network; the defaults are encodec_32khz's."""
    sampling_rate: int = 32000
    audio_channels: int = 1
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: tuple[int, ...] = (8, 5, 4, 4)
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = False
    pad_mode: str = "reflect"
    compress: int = 2
    num_lstm_layers: int = 2
    trim_right_ratio: float = 1.0
    hidden_size: int = 128
    codebook_size: int = 2048
    codebook_dim: int = 128
    use_conv_shortcut: bool = False
    target_bandwidths: tuple[float, ...] = (2.2,)
    norm_type: str = "weight_norm"
    normalize: bool = False
    chunk_length_s: float | None = None
    overlap: float | None = None

    def __post_init__(self):
        unsupported = {"normalize": (self.normalize, False), "chunk_length_s": (self.chunk_length_s, None),
                       "norm_type": (self.norm_type, "weight_norm"), "audio_channels": (self.audio_channels, 1)}
        for name, (value, wanted) in unsupported.items():
            if value != wanted:
                raise ValueError(f"EnCodec config {name}={value!r} is not supported, expected {wanted!r} (the engine "
                                 "runs the mono 24/32 kHz models; the 48 kHz stereo model's normalized chunks are "
                                 "not implemented)")
        if self.codebook_dim != self.hidden_size:
            raise ValueError(f"EnCodec config codebook_dim={self.codebook_dim} != hidden_size={self.hidden_size}: "
                             "EnCodec's RVQ has no projection, the encoder's output is quantized as it is")
        if self.pad_mode not in ("reflect", "constant", "replicate", "circular"):
            raise ValueError(f"EnCodec config pad_mode={self.pad_mode!r}, expected 'reflect' (or 'constant', "
                             "'replicate', 'circular')")
        if self.codebook_size < 2 or self.codebook_size & (self.codebook_size - 1):
            raise ValueError(f"EnCodec config codebook_size={self.codebook_size}, expected a power of 2")
        if not self.upsampling_ratios or not self.target_bandwidths:
            raise ValueError("EnCodec config needs upsampling_ratios and target_bandwidths")
        if self.num_quantizers < 1:
            raise ValueError(f"EnCodec config target_bandwidths={self.target_bandwidths} give no codebook at "
                             f"{self.frame_rate} frames/s of {math.log2(self.codebook_size):g} bits")
        if not self.use_causal_conv and self.trim_right_ratio != 1.0:
            raise ValueError(f"EnCodec config trim_right_ratio={self.trim_right_ratio} only applies to causal convs")

    @classmethod
    def from_dict(cls, values: Mapping) -> "EncodecConfig":
        """From a transformers config.json's contents; absent fields take transformers' defaults
        (those of encodec_24khz), unknown ones (architectures, dtype, ...) are ignored."""
        transformers_defaults = dict(sampling_rate=24000, num_filters=32, upsampling_ratios=(8, 5, 4, 2),
                                     use_causal_conv=True, codebook_size=1024, codebook_dim=None,
                                     use_conv_shortcut=True,
                                     target_bandwidths=(1.5, 3.0, 6.0, 12.0, 24.0))
        kwargs = {}
        for f in fields(cls):
            value = values.get(f.name, transformers_defaults.get(f.name, f.default))
            if f.name == "codebook_dim" and value is None:
                value = values.get("hidden_size", cls.hidden_size)
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsampling_ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sampling_rate / self.hop_length)  # transformers' rounding

    @property
    def num_quantizers(self) -> int:
        """Codebooks in the checkpoint: those the largest target bandwidth needs."""
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * math.ceil(math.log2(self.codebook_size))))

    def levels_for_bandwidth(self, bandwidth: float) -> int:
        """Codebooks used at `bandwidth` kbps, transformers' rule (floor, at least 1)."""
        bits_per_level = math.log2(self.codebook_size) * self.frame_rate
        return int(max(1, math.floor(bandwidth * 1000 / bits_per_level)))


# ---- layers (SEANet's, models/seanet.py) ----------------------------------------------------
class ResnetBlock(nn.Module):
    def __init__(self, c: EncodecConfig, dim: int, dilation: int, **kw):
        super().__init__()
        hidden = dim // c.compress
        # Indices 1 and 3 as in transformers' block list [ELU, conv, ELU, conv] (names are the checkpoint's).
        kw = dict(causal=c.use_causal_conv, pad_mode=c.pad_mode, **kw)
        self.block = nn.ModuleDict({"1": Conv(dim, hidden, c.residual_kernel_size, dilation=dilation, **kw),
                                    "3": Conv(hidden, dim, 1, **kw)})
        self.shortcut = Conv(dim, dim, 1, **kw) if c.use_conv_shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block["3"](F.elu(self.block["1"](F.elu(x))))
        return (self.shortcut(x) if self.shortcut is not None else x) + h


def _conv(c: EncodecConfig, *args, **kw) -> Conv:
    return Conv(*args, causal=c.use_causal_conv, pad_mode=c.pad_mode, **kw)


def _encoder_layers(c: EncodecConfig, **kw) -> list[nn.Module]:
    layers: list[nn.Module] = [_conv(c, c.audio_channels, c.num_filters, c.kernel_size, **kw)]
    channels = c.num_filters
    for ratio in reversed(c.upsampling_ratios):
        layers += [ResnetBlock(c, channels, c.dilation_growth_rate ** j, **kw) for j in range(c.num_residual_layers)]
        layers += [ELU(), _conv(c, channels, 2 * channels, 2 * ratio, stride=ratio, **kw)]
        channels *= 2
    return layers + [LSTM(channels, c.num_lstm_layers, **kw), ELU(),
                     _conv(c, channels, c.hidden_size, c.last_kernel_size, **kw)]


def _decoder_layers(c: EncodecConfig, **kw) -> list[nn.Module]:
    channels = c.num_filters * 2 ** len(c.upsampling_ratios)
    layers: list[nn.Module] = [_conv(c, c.hidden_size, channels, c.kernel_size, **kw),
                               LSTM(channels, c.num_lstm_layers, **kw)]
    for ratio in c.upsampling_ratios:
        layers += [ELU(), ConvTranspose(channels, channels // 2, 2 * ratio, ratio, causal=c.use_causal_conv,
                                        trim_right_ratio=c.trim_right_ratio, **kw)]
        channels //= 2
        layers += [ResnetBlock(c, channels, c.dilation_growth_rate ** j, **kw) for j in range(c.num_residual_layers)]
    return layers + [ELU(), _conv(c, c.num_filters, c.audio_channels, c.last_kernel_size, **kw)]


class EncodecNetwork(nn.Module):
    """Encoder, decoder and the RVQ codebooks. embed: wav [B, 1, N] at config.sampling_rate ->
    frames [B, hidden, ceil(N / hop)]; decode_frames: frames [B, hidden, T] -> wav [B, 1, T * hop]
    (float32). The codebooks stay float32 whatever the convs' dtype, and follow the convs' device;
    the RVQ between them is codecs.Encodec's (the engine's ops)."""

    def __init__(self, config: EncodecConfig, codebooks: torch.Tensor, device=None, dtype=None):
        super().__init__()
        if tuple(codebooks.shape) != (config.num_quantizers, config.codebook_size, config.codebook_dim):
            raise ValueError(f"EnCodec codebooks have shape {tuple(codebooks.shape)}, expected "
                             f"{(config.num_quantizers, config.codebook_size, config.codebook_dim)} from the config")
        self.config = config
        kw = {"device": device, "dtype": dtype}
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_encoder_layers(config, **kw))
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(_decoder_layers(config, **kw))
        self._codebooks = codebooks.detach().to(device=device, dtype=torch.float32)
        self._rvq: dict[tuple[torch.device, int], RVQCodebooks] = {}

    def codebooks(self, levels: int | None = None) -> RVQCodebooks:
        """The first `levels` codebooks (all by default) on the convs' device, prepared once."""
        levels = levels or self.config.num_quantizers
        device = self.encoder.layers[0].weight.device
        key = (device, levels)
        if key not in self._rvq:
            self._rvq[key] = RVQCodebooks(self._codebooks[:levels].to(device))
        return self._rvq[key]

    def embed(self, wav: torch.Tensor) -> torch.Tensor:
        """Encoder output [B, hidden, T] (float32) of wav [B, 1, N]."""
        x = wav.to(self.encoder.layers[0].weight.dtype)
        for layer in self.encoder.layers:
            x = layer(x)
        return x.float()

    def decode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Decoder output [B, 1, T * hop] (float32) of frames [B, hidden, T] (the codewords' sum)."""
        x = frames.to(self.decoder.layers[0].weight.dtype)
        for layer in self.decoder.layers:
            x = layer(x)
        return x.float()

    # -- weights --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None) -> "EncodecNetwork":
        """Loads a transformers-format directory (config.json + model.safetensors, or
        pytorch_model.bin) of facebook/encodec_32khz or encodec_24khz. A checkpoint whose tensors
        do not match the config raises ValueError listing the missing, unexpected and mis-shaped ones."""
        from anygpt_engine.codecs.loaders import load_state_dict

        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a directory path (str or os.PathLike), got {type(path).__name__}")
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"EnCodec path {directory} is not a directory (expected config.json + "
                                    "model.safetensors, as transformers saves EncodecModel)")
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"EnCodec directory {directory} has no config.json")
        with open(directory / "config.json") as f:
            values = json.load(f)
        if values.get("model_type", "encodec") != "encodec":
            raise ValueError(f"{directory / 'config.json'} has model_type={values['model_type']!r}, expected 'encodec'")
        config = EncodecConfig.from_dict(values)
        return cls.from_state_dict(load_state_dict(directory), config, device=device, dtype=dtype)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], config: EncodecConfig, device=None,
                        dtype=None) -> "EncodecNetwork":
        """From transformers' EncodecModel state dict (either weight-norm spelling)."""
        levels, tensors, unexpected, misshaped = _engine_tensors(state, config)
        shape = (config.codebook_size, config.codebook_dim)
        missing = [f"quantizer.layers.{level}.codebook.embed" for level in range(config.num_quantizers)
                   if level not in levels]
        misshaped += [f"quantizer.layers.{level}.codebook.embed {tuple(t.shape)} (expected {shape})"
                      for level, t in sorted(levels.items()) if tuple(t.shape) != shape]
        model = cls(config, torch.empty(config.num_quantizers, *shape, device="meta"), device="meta", dtype=dtype)
        model.to_empty(device=device or "cpu")
        params = dict(model.named_parameters())
        unexpected += [_checkpoint_name(name) for name in tensors if name not in params]
        with torch.no_grad():
            for name, param in params.items():
                if name not in tensors:
                    missing.append(_checkpoint_name(name))
                elif tuple(tensors[name].shape) != tuple(param.shape):
                    misshaped.append(f"{_checkpoint_name(name)} {tuple(tensors[name].shape)} "
                                     f"(expected {tuple(param.shape)})")
                else:
                    param.copy_(tensors[name])
        if missing or unexpected or misshaped:
            raise ValueError(f"EnCodec checkpoint does not match its config ({_describe(config)}): "
                             f"missing {_listing(missing)}; unexpected {_listing(sorted(unexpected))}; "
                             f"wrong shape {_listing(misshaped)}")
        codebooks = torch.stack([levels[level].float() for level in range(config.num_quantizers)])
        if not bool(torch.isfinite(codebooks).all()):
            raise ValueError("EnCodec checkpoint has NaN or infinite codebook values")
        if not bool(codebooks.abs().sum(dim=(1, 2)).gt(0).all()):
            raise ValueError("EnCodec checkpoint has an all-zero codebook: it was never trained / initialised")
        model._codebooks = codebooks.to(device or "cpu")
        return model.requires_grad_(False).eval()


# ---- checkpoint names ---------------------------------------------------------------------------
# transformers wraps every conv in an EncodecConv1d whose `.conv` holds the weights; the engine's
# parameter is the checkpoint name without that `.conv`, the weight-norm pair folded into `weight`.
# LSTM tensors keep their names.
_CONV_PART = re.compile(r"^(?P<module>.+)\.conv\.(?P<part>bias|weight|weight_g|weight_v|"
                        r"parametrizations\.weight\.original0|parametrizations\.weight\.original1)$")
_CODEBOOK = re.compile(r"^quantizer\.layers\.(\d+)\.codebook\.(embed|inited|cluster_size|embed_avg)$")
_LSTM = re.compile(r"^(?:en|de)coder\.layers\.\d+\.lstm\.(?:weight|bias)_(?:ih|hh)_l\d+$")
_WEIGHT_NORM_PAIRS = (("weight_g", "weight_v"),  # torch.nn.utils.weight_norm, the published files
                      ("parametrizations.weight.original0", "parametrizations.weight.original1"))  # parametrize


def _engine_tensors(state: Mapping[str, torch.Tensor], config: EncodecConfig):
    """A transformers state dict as (codebooks {level: embed}, engine tensors {parameter name:
    float32 tensor}, unexpected keys, mis-shaped notes). The quantizer's training buffers
    (inited, cluster_size, embed_avg) are read past."""
    levels: dict[int, torch.Tensor] = {}
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # parameter -> {part: (key, tensor)}
    unexpected: list[str] = []
    for key, tensor in state.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"EnCodec checkpoint entry {key!r} is a {type(tensor).__name__}, expected a tensor")
        if m := _CODEBOOK.match(key):
            if int(m.group(1)) >= config.num_quantizers:
                unexpected.append(key)
            elif m.group(2) == "embed":
                levels[int(m.group(1))] = tensor
        elif m := _CONV_PART.match(key):
            name = f"{m['module']}.{'bias' if m['part'] == 'bias' else 'weight'}"
            groups.setdefault(name, {})[m["part"]] = (key, tensor)
        elif _LSTM.match(key):
            groups.setdefault(key, {})["plain"] = (key, tensor)
        else:
            unexpected.append(key)
    tensors: dict[str, torch.Tensor] = {}
    misshaped: list[str] = []
    for name, parts in groups.items():
        if len(parts) == 1 and set(parts) & {"bias", "weight", "plain"}:
            tensors[name] = next(iter(parts.values()))[1].float()
            continue
        pair = next((p for p in _WEIGHT_NORM_PAIRS if set(parts) == set(p)), None)
        if pair is None:  # half a pair, or two spellings of one weight
            unexpected += [key for key, _ in parts.values()]
            continue
        (g_key, g), (_, v) = parts[pair[0]], parts[pair[1]]
        if v.dim() < 2 or tuple(g.shape) != (v.shape[0],) + (1,) * (v.dim() - 1):
            misshaped.append(f"{g_key} {tuple(g.shape)} (expected [{v.shape[0] if v.dim() else '?'}, 1, 1] for "
                             f"a weight of shape {tuple(v.shape)})")
            continue
        # g * v / ||v|| over all dims but 0: what torch's weight_norm(dim=0) evaluates, bit for bit.
        tensors[name] = torch._weight_norm(v.float(), g.float(), 0)
    return levels, tensors, unexpected, misshaped


def _checkpoint_name(name: str) -> str:
    """Engine parameter -> the checkpoint key it reads (conv weights: the published weight_g/_v pair)."""
    if ".lstm." in name:
        return name
    module, _, part = name.rpartition(".")
    return f"{module}.conv.bias" if part == "bias" else f"{module}.conv.weight_g/weight_v"


def _describe(c: EncodecConfig) -> str:
    return (f"{c.sampling_rate} Hz, num_filters {c.num_filters}, ratios {list(c.upsampling_ratios)}, "
            f"{c.num_quantizers} x {c.codebook_size} x {c.codebook_dim} codebooks, "
            f"use_conv_shortcut {c.use_conv_shortcut}")


def _listing(names: Sequence[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:8])
    return f"{len(names)} [{shown}{', ...' if len(names) > 8 else ''}]"
