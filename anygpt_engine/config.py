"""Backbone configuration: AnyGPT presets and HF config.json reading (transformers 4.x and 5.x)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

# AnyGPT-base trained past its config's max_position_embeddings (2048): never cap below this.
MIN_CONTEXT = 4096
ANYGPT_VOCAB_SIZE = 53516


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-family backbone. `dtype` is the checkpoint's storage dtype."""

    vocab_size: int = ANYGPT_VOCAB_SIZE
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 11008
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_seq_len: int = MIN_CONTEXT
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    dtype: str = "bfloat16"
    name: str = "custom"

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                    "max_seq_len")
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{field}={value!r}, expected a positive int")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads} (grouped-query attention needs whole groups)")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"ModelConfig.hidden_size={self.hidden_size} is not divisible by "
                                 f"num_heads={self.num_heads}; give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim}, expected a positive even int (rotary pairs)")
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta={self.rope_theta}, expected > 0")
        if not self.rms_norm_eps >= 0:
            raise ValueError(f"ModelConfig.rms_norm_eps={self.rms_norm_eps}, expected >= 0")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"ModelConfig.dtype={self.dtype!r}, expected 'float32', 'float16' or 'bfloat16'")

    # -- presets ---------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preset {name!r}, expected one of {sorted(PRESETS)}") from None

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # -- sizes -----------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        h = self.hidden_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * self.intermediate_size + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + embed + head + h

    # -- HF config.json --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        """Reads an HF LlamaForCausalLM config.json (a file or the checkpoint directory)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no config.json at {file}")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from err
        return cls.from_hf_dict(raw, name=path.name if path.is_dir() else path.parent.name)

    @classmethod
    def from_hf_dict(cls, raw: dict, name: str = "custom") -> "ModelConfig":
        model_type = raw.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"config.json model_type={model_type!r}, expected 'llama' (AnyGPT's backbone)")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise ValueError(f"config.json {flag}=true is not supported (LLaMA-2 has no biases)")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act={act!r}, expected 'silu'")
        # transformers 5 nests rope settings in rope_parameters; 4.x has rope_theta/rope_scaling.
        rope = raw.get("rope_parameters") or {}
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", (raw.get("rope_scaling") or {}).get("rope_type", "default"))
        if rope_type != "default" or (raw.get("rope_scaling") and raw["rope_scaling"].get("type") not in (None, "default")):
            raise ValueError(f"config.json rope scaling {rope_type!r} is not supported (expected plain RoPE)")
        dtype = raw.get("dtype", raw.get("torch_dtype")) or "float32"
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"config.json dtype={dtype!r}, expected float32, float16 or bfloat16")
        heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id", 2)
        eos = eos[0] if isinstance(eos, list) else eos
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            intermediate_size=raw["intermediate_size"],
            head_dim=raw.get("head_dim"),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_seq_len=max(int(raw.get("max_position_embeddings", MIN_CONTEXT)), MIN_CONTEXT),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=_int_or(raw.get("bos_token_id"), 1),
            eos_token_id=_int_or(eos, 2),
            pad_token_id=_int_or(raw.get("pad_token_id"), 0),
            dtype=dtype,
            name=name,
        )

    def to_hf_dict(self) -> dict:
        """config.json contents for transformers' LlamaConfig (used by --compare hf and tests)."""
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_bias": False,
            "mlp_bias": False,
        }


def _int_or(value, default: int) -> int:
    return default if value is None else int(value)


PRESETS = {
    "anygpt-7b": ModelConfig(name="anygpt-7b"),
    # Same vocabulary (so modality ranges and constrained decoding are real), small body.
    "tiny": ModelConfig(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256,
                        dtype="float32", name="tiny"),
}
