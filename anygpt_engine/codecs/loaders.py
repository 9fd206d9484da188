"""Codebook loaders for real checkpoints. Each returns RVQCodebooks [L, K, D] (float32):

- SpeechTokenizer: `quantizer.vq.layers.{l}._codebook.embed`, 8 x 1024 x 1024, no projection.
- EnCodec 32 kHz (AnyGPT's music codec): 4 x 2048 x 128, either transformers' EncodecModel
  (`quantizer.layers.{l}.codebook.embed`) or the original encodec/audiocraft layout
  (`quantizer.vq.layers.{l}._codebook.embed`).
- SEED: one 8192 x 32 codebook, `quantize.embedding.weight` (a single-level RVQ).

A source is a checkpoint file (.pt/.pth/.bin/.ckpt via torch.load(weights_only=True), or
.safetensors), a directory holding model.safetensors / pytorch_model.bin, a state dict, or an
nn.Module. Key prefixes (e.g. "model.") are found, not assumed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch

from anygpt_engine.ops.rvq import RVQCodebooks

_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")


def load_state_dict(source) -> Mapping[str, torch.Tensor]:
    """Tensors of a checkpoint (see module doc for what `source` may be), on the CPU."""
    if isinstance(source, torch.nn.Module):
        return source.state_dict()
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path, a state dict or an nn.Module, got {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        found = [path / name for name in _DIR_FILES if (path / name).exists()]
        if not found:
            raise FileNotFoundError(f"{path} holds none of {_DIR_FILES}")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]  # training checkpoints nest the weights
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict")
    return state


def stack_codebooks(state: Mapping[str, torch.Tensor], pattern: str, what: str) -> torch.Tensor:
    """The tensors whose keys end with `pattern` ({level} stands for 0, 1, ...), stacked [L, K, D].
    Exactly one key prefix must match, and levels must run 0..L-1 with equal shapes."""
    regex = re.compile(r"^(.*?)" + re.escape(pattern).replace(r"\{level\}", r"(\d+)") + "$")
    by_prefix: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        m = regex.match(key)
        if m:
            by_prefix.setdefault(m.group(1), {})[int(m.group(2))] = value
    if not by_prefix:
        raise KeyError(f"no {what} codebooks: no key ends with {pattern.format(level='<l>')!r}")
    if len(by_prefix) > 1:
        raise ValueError(f"{what} codebooks found under several prefixes {sorted(by_prefix)}; pass the sub-module's "
                         "state dict instead")
    levels = next(iter(by_prefix.values()))
    if sorted(levels) != list(range(len(levels))):
        raise ValueError(f"{what} codebook levels {sorted(levels)}, expected 0..{len(levels) - 1}")
    tensors = [levels[level] for level in range(len(levels))]
    for level, t in enumerate(tensors):
        if t.dim() != 2 or t.shape != tensors[0].shape:
            raise ValueError(f"{what} codebook level {level} has shape {tuple(t.shape)}, expected "
                             f"{tuple(tensors[0].shape)} like level 0 (2-D [K, D])")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{what} codebook level {level} has dtype {t.dtype}, expected floating point")
    return torch.stack([t.float() for t in tensors])


def _codebooks(stacked: torch.Tensor, what: str, device) -> RVQCodebooks:
    if not bool(stacked.abs().sum(dim=(1, 2)).gt(0).all()):
        # kmeans_init=True leaves codebooks all zeros until the first training batch.
        raise ValueError(f"{what} checkpoint has an all-zero codebook: it was never trained / initialised")
    return RVQCodebooks(stacked.to(device) if device is not None else stacked)


def speechtokenizer_codebooks(source, device=None) -> RVQCodebooks:
    """SpeechTokenizer's 8 RVQ codebooks (1024 x 1024 each). Raises if the checkpoint projects
    into the codebooks (project_in), which this RVQ does not apply."""
    state = load_state_dict(source)
    if any(re.search(r"vq\.layers\.\d+\.project_in\.", key) for key in state):
        raise ValueError("SpeechTokenizer checkpoint has project_in/project_out layers (codebook_dim != dim); "
                         "the engine's RVQ expects codebooks in the encoder's space")
    return _codebooks(stack_codebooks(state, "vq.layers.{level}._codebook.embed", "SpeechTokenizer"),
                      "SpeechTokenizer", device)


def encodec_codebooks(source, device=None) -> RVQCodebooks:
    """EnCodec's RVQ codebooks (32 kHz: 4 x 2048 x 128), transformers' or encodec's key layout."""
    state = load_state_dict(source)
    for pattern in ("quantizer.layers.{level}.codebook.embed", "vq.layers.{level}._codebook.embed"):
        try:
            stacked = stack_codebooks(state, pattern, "EnCodec")
        except KeyError:
            continue
        return _codebooks(stacked, "EnCodec", device)
    raise KeyError("no EnCodec codebooks: expected keys ending with quantizer.layers.<l>.codebook.embed "
                   "(transformers) or vq.layers.<l>._codebook.embed (encodec)")


def seed_codebook(source, device=None) -> RVQCodebooks:
    """SEED's image codebook (8192 x 32) as a one-level RVQ (plain Euclidean nearest codeword)."""
    state = load_state_dict(source)
    keys = [k for k in state if k == "quantize.embedding.weight" or k.endswith(".quantize.embedding.weight")]
    if not keys:
        keys = [k for k in state if k == "embedding.weight"]  # a bare VectorQuantizer's state dict
    if len(keys) != 1:
        raise KeyError(f"expected one SEED codebook key ending with quantize.embedding.weight, found {keys}")
    weight = state[keys[0]]
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"{keys[0]} has shape {tuple(weight.shape)} and dtype {weight.dtype}, expected a float [K, D]")
    return _codebooks(weight.float()[None], "SEED", device)
