"""The engine: a model, its vocabulary and weights on a device, and a generate loop.

    engine = Engine("anygpt-7b")                       # preset, random bf16 weights on a GPU
    engine = Engine("/ckpt/AnyGPT-base")               # HF checkpoint directory
    outs = engine.generate([[1, 32000, ...]], SamplingParams.anygpt("speech"))

The KV cache here is a simple contiguous one (one row per prompt); prefill runs per prompt,
decode steps run the whole batch. Each decode step is device-only work (model, then the
sampler); the host reads the sampled ids once per step to decide which requests are done.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from anygpt_engine.config import ANYGPT_VOCAB_SIZE, PRESETS, ModelConfig
from anygpt_engine.models.llama import KVCache, Llama
from anygpt_engine.sampling import ModalityConstraint, SamplingParams, SamplingTensors, sample
from anygpt_engine.vocab import Vocabulary, token_ids
from anygpt_engine.weights import load_into

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r}, expected one of {sorted(_DTYPES)} or the matching torch dtype")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class _Run:
    """A batch being generated: per-row outputs on the host, everything else on the device."""

    prompts: list[list[int]]
    max_new: list[int]
    stops: list[frozenset]
    cache: KVCache
    sampling: SamplingTensors
    positions: torch.Tensor  # [B, 1] position of the next token to run
    last_tokens: torch.Tensor  # [B] newest sampled ids
    lengths: list[int]  # host count of each row's tokens (prompt + sampled): the next step's kv_len
    outputs: list[list[int]] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)


class Engine:
    """Runs one AnyGPT-style backbone. See the module docstring."""

    def __init__(self, model: str | os.PathLike | ModelConfig = "tiny", weights=None, device=None, dtype=None, *,
                 vocab: Vocabulary | None = None, constrain_modalities: bool = True, seed: int = 0):
        checkpoint = None
        if isinstance(model, ModelConfig):
            config = model
        elif isinstance(model, str) and model in PRESETS:
            config = ModelConfig.preset(model)
        elif isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
            config = ModelConfig.from_pretrained(model)
            checkpoint = Path(model)
        else:
            raise ValueError(f"model={model!r}, expected a preset {sorted(PRESETS)}, a ModelConfig or a checkpoint "
                             "directory")
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r}, but torch sees no CUDA device")
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = resolve_dtype(dtype)

        self.model = Llama(config, device=self.device, dtype=self.dtype)
        source = weights if weights is not None else checkpoint
        if source is None:
            self.model.init_random(seed)
        elif isinstance(source, dict):
            load_into(self.model, config, source.items())
        else:
            load_into(self.model, config, source)
        self.model.eval()

        if vocab is None:
            vocab = self._default_vocab(checkpoint)
        if vocab.size > config.vocab_size:
            raise ValueError(f"vocab has {vocab.size} ids but the model's vocab_size is {config.vocab_size}")
        self.vocab = vocab
        self.constraint = ModalityConstraint.build(vocab.__class__(config.vocab_size, vocab.spans, vocab.special),
                                                   self.device, enabled=constrain_modalities)
        self._seed_source = random.Random(seed)

    def _default_vocab(self, checkpoint: Path | None) -> Vocabulary:
        if checkpoint is not None:
            try:
                return Vocabulary.from_pretrained(checkpoint)
            except FileNotFoundError:
                pass
        if self.config.vocab_size >= ANYGPT_VOCAB_SIZE:
            return Vocabulary.anygpt()
        return Vocabulary.text_only(self.config.vocab_size)

    def __repr__(self) -> str:
        c = self.config
        return (f"Engine({c.name}: {c.num_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, "
                f"{self.dtype}, {self.device})")

    # -- inputs --------------------------------------------------------------------------------
    def _prompt(self, name: str, ids) -> list[int]:
        prompt = token_ids(name, ids, self.config.vocab_size)
        if len(prompt) >= self.config.max_seq_len:
            raise ValueError(f"{name} has {len(prompt)} tokens; the context holds {self.config.max_seq_len}, "
                             "so a prompt may have at most max_seq_len - 1")
        return prompt

    # -- scoring -------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, prompt_ids) -> torch.Tensor:
        """float32 logits [len, vocab] of every prompt position (position i predicts token i+1)."""
        prompt = self._prompt("prompt_ids", prompt_ids)
        n = len(prompt)
        cache = KVCache(self.config, 1, n, self.device, self.dtype)
        tokens = torch.tensor([prompt], device=self.device)
        positions = torch.arange(n, device=self.device).unsqueeze(0)
        h = self.model(tokens, positions, cache, slice(0, 1), n)
        return self.model.logits(h[0])

    # -- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[list[int]]:
        """Generated ids for each prompt (a stop token, when sampled, ends and is included)."""
        run = self._start(prompts, params)
        while not all(run.finished):
            self._collect(run, self._decode_step(run))
        return run.outputs

    @torch.inference_mode()
    def _start(self, prompts, params) -> _Run:
        """Validates, prefills every prompt and samples each row's first token."""
        if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
            prompts = list(prompts)
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id sequences")
        prompts = [self._prompt(f"prompts[{i}]", p) for i, p in enumerate(prompts)]
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts) or not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError(f"params must be one SamplingParams or a list of {len(prompts)}, got {params!r}")
        for i, p in enumerate(params):
            bad = [t for t in (p.stop_token_ids or ()) if t >= self.config.vocab_size]
            if bad:
                raise ValueError(f"params[{i}].stop_token_ids has {bad}, outside the vocabulary "
                                 f"(size {self.config.vocab_size})")

        b = len(prompts)
        max_new = [min(p.max_new_tokens, self.config.max_seq_len - len(x)) for p, x in zip(params, prompts)]
        capacity = max(len(x) + m for x, m in zip(prompts, max_new))
        stops = [p.stop_token_ids if p.stop_token_ids is not None else (self.config.eos_token_id,) for p in params]
        seeds = [p.seed if p.seed is not None else self._seed_source.getrandbits(63) for p in params]
        sampling = SamplingTensors.build(params, seeds, prompts, stops, self.config.vocab_size, self.device,
                                         [self.constraint.state_after(x) for x in prompts])
        cache = KVCache(self.config, b, capacity, self.device, self.dtype)
        last_logits = torch.empty(b, self.config.vocab_size, device=self.device, dtype=torch.float32)
        for row, prompt in enumerate(prompts):
            n = len(prompt)
            tokens = torch.tensor([prompt], device=self.device)
            positions = torch.arange(n, device=self.device).unsqueeze(0)
            h = self.model(tokens, positions, cache, slice(row, row + 1), n)
            last_logits[row] = self.model.logits(h[0, -1])
        run = _Run(
            prompts=prompts, max_new=max_new, stops=[frozenset(s) for s in stops], cache=cache, sampling=sampling,
            positions=torch.tensor([[len(x)] for x in prompts], device=self.device),
            last_tokens=torch.empty(b, dtype=torch.long, device=self.device),
            lengths=[len(x) for x in prompts], outputs=[[] for _ in prompts], finished=[False] * b,
        )
        self._collect(run, sample(last_logits, sampling, self.constraint))
        return run

    @torch.inference_mode()
    def _decode_step(self, run: _Run) -> torch.Tensor:
        """One batched decode step on the device: the newest tokens in, the next tokens out."""
        kv_len = max(n for n, done in zip(run.lengths, run.finished) if not done)
        h = self.model(run.last_tokens.unsqueeze(1), run.positions, run.cache, slice(None), kv_len)
        tokens = sample(self.model.logits(h[:, -1]), run.sampling, self.constraint)
        # Finished rows keep running (their results are ignored) at a clamped position.
        run.positions.add_(1).clamp_(max=run.cache.capacity - 1)
        return tokens

    @torch.inference_mode()
    def _collect(self, run: _Run, tokens: torch.Tensor) -> None:
        """Host side of a step: append each live row's token and mark finished rows."""
        run.last_tokens.copy_(tokens)
        for row, token in enumerate(tokens.tolist()):
            if run.finished[row]:
                continue
            run.outputs[row].append(token)
            run.lengths[row] += 1
            if token in run.stops[row] or len(run.outputs[row]) >= run.max_new[row]:
                run.finished[row] = True
