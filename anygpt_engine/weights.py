"""Loading HF LLaMA checkpoints (safetensors or PyTorch .bin, single or sharded) straight into
the engine's layout (see models/llama.py), tensor by tensor, without transformers."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

import torch

from anygpt_engine.config import ModelConfig

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_PARTS = {
    "self_attn.q_proj.weight": ("wqkv", 0),
    "self_attn.k_proj.weight": ("wqkv", 1),
    "self_attn.v_proj.weight": ("wqkv", 2),
    "self_attn.o_proj.weight": ("wo", None),
    "mlp.gate_proj.weight": ("w13", 0),
    "mlp.up_proj.weight": ("w13", 1),
    "mlp.down_proj.weight": ("w2", None),
    "input_layernorm.weight": ("attention_norm", None),
    "post_attention_layernorm.weight": ("ffn_norm", None),
}
_TOP = {"model.embed_tokens.weight": "tok_embeddings", "model.norm.weight": "norm", "lm_head.weight": "output"}
# Buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """Weight files of a checkpoint directory, in load order."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [path / name for name in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).exists():
            return [path / single]
    raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or shard index in {path}")


def iter_checkpoint(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of a checkpoint directory, one file open at a time."""
    for file in checkpoint_files(path):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()


def engine_name(hf_name: str) -> tuple[str, int | None] | None:
    """Engine parameter name and stacking slot of an HF tensor name, None for ignored names."""
    if hf_name in _TOP:
        return _TOP[hf_name], None
    if _IGNORED.fullmatch(hf_name):
        return None
    match = _LAYER.fullmatch(hf_name)
    if match and match.group(2) in _LAYER_PARTS:
        target, slot = _LAYER_PARTS[match.group(2)]
        return f"layers.{match.group(1)}.{target}", slot
    raise KeyError(hf_name)


def load_into(model: torch.nn.Module, config: ModelConfig, tensors) -> None:
    """Copies HF-named tensors into `model` (an engine Llama), checking names and shapes.

    `tensors` is an iterable of (name, tensor) or a checkpoint directory. Raises ValueError
    naming every missing and unexpected tensor."""
    if isinstance(tensors, (str, os.PathLike)):
        tensors = iter_checkpoint(tensors)
    params = dict(model.named_parameters())
    row_splits = {
        "wqkv": [0, config.q_size, config.q_size + config.kv_size],
        "w13": [0, config.intermediate_size],
    }
    filled: dict[str, set] = {name: set() for name in params}
    unexpected, wrong_shape = [], []
    with torch.no_grad():
        for hf_name, tensor in tensors:
            try:
                mapped = engine_name(hf_name)
            except KeyError:
                unexpected.append(hf_name)
                continue
            if mapped is None or (mapped[0] == "output" and config.tie_word_embeddings):
                continue
            name, slot = mapped
            if name not in params:
                unexpected.append(hf_name)
                continue
            target = params[name]
            if slot is not None:
                kind = name.rsplit(".", 1)[1]
                start = row_splits[kind][slot]
                end = row_splits[kind][slot + 1] if slot + 1 < len(row_splits[kind]) else target.shape[0]
                target = target[start:end]
            if tuple(tensor.shape) != tuple(target.shape):
                wrong_shape.append(f"{hf_name}: {tuple(tensor.shape)}, expected {tuple(target.shape)}")
                continue
            target.copy_(tensor)
            filled[name].add(slot)
    expected_slots = {"wqkv": {0, 1, 2}, "w13": {0, 1}}
    missing = []
    for name, slots in filled.items():
        need = expected_slots.get(name.rsplit(".", 1)[-1], {None})
        if slots != need:
            missing.append(name if need == {None} else f"{name} (slots {sorted(need - slots)})")
    if unexpected or missing or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if wrong_shape:
            parts.append(f"wrong shapes: {wrong_shape[:8]}")
        raise ValueError("checkpoint does not match the model config: " + "; ".join(parts))


_HF_NAMES = {"tok_embeddings": "model.embed_tokens.weight", "norm": "model.norm.weight", "output": "lm_head.weight",
             "attention_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight",
             "wo": "self_attn.o_proj.weight", "w2": "mlp.down_proj.weight"}


def hf_tensors(name: str, tensor: torch.Tensor, config: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """One engine parameter (`Llama.named_parameters()` name) as the HF tensors it holds: the
    fused wqkv and w13 split into q/k/v and gate/up (views)."""
    if not name.startswith("layers."):
        return [(_HF_NAMES[name], tensor)]
    _, i, kind = name.split(".")
    prefix = f"model.layers.{i}."
    if kind == "wqkv":
        parts = tensor.split([config.q_size, config.kv_size, config.kv_size])
        return [(prefix + f"self_attn.{x}_proj.weight", part) for x, part in zip("qkv", parts)]
    if kind == "w13":
        return [(prefix + f"mlp.{x}_proj.weight", part) for x, part in zip(("gate", "up"), tensor.chunk(2))]
    return [(prefix + _HF_NAMES[kind], tensor)]


def hf_state_dict(model: torch.nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The engine's weights under HF names (for transformers comparisons and export)."""
    from anygpt_engine.quantization import QuantizedWeight

    if any(isinstance(m, QuantizedWeight) for m in model.modules()):
        raise ValueError("the model's matrices are quantized (Engine(quantization=...)); export the 16-bit weights "
                         "they were quantized from instead")
    return {hf_name: part.detach() for name, p in model.named_parameters()
            for hf_name, part in hf_tensors(name, p, config)}
