"""Sampling parameters and the torch reference sampler.

The sampler is a pure function of device tensors (no .item(), no torch.multinomial, no
host branching on device values), so a decode step that calls it can be captured in a CUDA
graph. Randomness is counter-based: the noise for (request seed, step, token id) is a hash,
so a request draws the same tokens alone or in any batch.

Processing order follows transformers' generate: repetition penalty, then the logit masks
(allowed ids, min_new_tokens), then temperature, top-k, top-p, and finally a Gumbel-max draw
(equivalent to sampling the softmax of what survives). temperature == 0 is greedy: argmax,
lowest index on ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

_ANYGPT_PRESETS = {
    # AnyGPT's config/*_generate_config.json (do_sample; transformers' default top_k=50 applies
    # where the file sets none); min_new_tokens 10 throughout.
    "text": dict(temperature=1.0, top_k=50, max_new_tokens=100),
    "image": dict(temperature=1.0, top_k=50, max_new_tokens=200),
    "speech": dict(temperature=1.0, top_k=50, repetition_penalty=1.05, max_new_tokens=1500),
    "music": dict(temperature=1.0, top_k=200, repetition_penalty=1.15, max_new_tokens=2000),
}


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 = greedy. top_k 0 = off. top_p 1 = off.

    stop_token_ids None means the model's eos; an empty tuple means never stop early.
    A sampled stop token ends the request and is included in its output (as transformers does).
    seed None draws a fresh seed when the request starts.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] | None = None
    seed: int | None = None

    def __post_init__(self):
        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ValueError(f"SamplingParams.{name}={value!r}, expected a number")
            return value

        if not 0 <= number("temperature") < math.inf:
            raise ValueError(f"SamplingParams.temperature={self.temperature}, expected >= 0 (0 = greedy)")
        if not 0 < number("top_p") <= 1:
            raise ValueError(f"SamplingParams.top_p={self.top_p}, expected 0 < top_p <= 1")
        if not 0 < number("repetition_penalty") < math.inf:
            raise ValueError(f"SamplingParams.repetition_penalty={self.repetition_penalty}, expected > 0 (1 = off)")
        for name, low in (("top_k", 0), ("min_new_tokens", 0), ("max_new_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"SamplingParams.{name}={value!r}, expected an int >= {low}")
        if self.stop_token_ids is not None:
            stops = tuple(self.stop_token_ids)
            if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stops):
                raise ValueError(f"SamplingParams.stop_token_ids={self.stop_token_ids!r}, expected non-negative ints")
            object.__setattr__(self, "stop_token_ids", stops)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"SamplingParams.seed={self.seed!r}, expected an int or None")

    @classmethod
    def greedy(cls, max_new_tokens: int = 128, **kwargs) -> "SamplingParams":
        return cls(temperature=0.0, max_new_tokens=max_new_tokens, **kwargs)

    @classmethod
    def anygpt(cls, modality: str, **overrides) -> "SamplingParams":
        """AnyGPT's own generation config for 'text', 'image', 'speech' or 'music'."""
        try:
            preset = _ANYGPT_PRESETS[modality]
        except KeyError:
            raise ValueError(f"modality={modality!r}, expected one of {sorted(_ANYGPT_PRESETS)}") from None
        return cls(**{"min_new_tokens": 10, **preset, **overrides})


# -- counter-based noise ---------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors; products wrap mod 2^64, and only the
    low 32 bits are kept, so the result is the same on every device."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """U(0, 1) noise [B, V] keyed by (seed, step, token id): batch composition never changes it."""
    token = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    key = _hash32(_hash32(seeds.unsqueeze(1) ^ 0x9E3779B9) + steps.unsqueeze(1) * 0x632BE5AB + 0x85EBCA6B)
    bits = _hash32(key ^ _hash32(token + 0x27D4EB2F).unsqueeze(0))
    # 24 random bits, centred in their bucket: never 0 or 1, so -log(-log(u)) stays finite.
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


# -- per-batch sampling state ----------------------------------------------------------------
@dataclass
class SamplingTensors:
    """Per-row parameters and state of a batch, all on the model's device."""

    temperature: torch.Tensor  # [B] f32
    top_k: torch.Tensor  # [B] i64, 0 = off
    top_p: torch.Tensor  # [B] f32
    repetition_penalty: torch.Tensor  # [B] f32
    min_new_tokens: torch.Tensor  # [B] i64
    seeds: torch.Tensor  # [B] i64
    stop_mask: torch.Tensor  # [B, V] bool: tokens that end the row
    seen: torch.Tensor  # [B, V] bool: tokens in prompt or output (repetition penalty)
    generated: torch.Tensor  # [B] i64: tokens sampled so far (also the noise counter)
    open_modality: torch.Tensor  # [B] i64: index into the constraint table, 0 = no span open
    # Host-side facts about the whole batch, fixed at build time: they skip work no row needs
    # without ever branching on device values.
    any_random: bool = True
    any_top_k: bool = True
    any_top_p: bool = True
    any_penalty: bool = True

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], prompts: list[list[int]],
              stop_ids: list[tuple[int, ...]], vocab_size: int, device: torch.device,
              open_modality: list[int]) -> "SamplingTensors":
        b = len(params)
        stop_mask = torch.zeros(b, vocab_size, dtype=torch.bool, device=device)
        seen = torch.zeros(b, vocab_size, dtype=torch.bool, device=device)
        for row, (stops, prompt) in enumerate(zip(stop_ids, prompts)):
            if stops:
                stop_mask[row, torch.tensor(stops, device=device)] = True
            seen[row, torch.tensor(prompt, device=device)] = True

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            temperature=column([p.temperature for p in params], torch.float32),
            top_k=column([p.top_k for p in params], torch.int64),
            top_p=column([p.top_p for p in params], torch.float32),
            repetition_penalty=column([p.repetition_penalty for p in params], torch.float32),
            min_new_tokens=column([p.min_new_tokens for p in params], torch.int64),
            seeds=column([s & 0x7FFFFFFFFFFFFFFF for s in seeds], torch.int64),
            stop_mask=stop_mask,
            seen=seen,
            generated=torch.zeros(b, dtype=torch.int64, device=device),
            open_modality=column(open_modality, torch.int64),
            any_random=any(p.temperature > 0 for p in params),
            any_top_k=any(p.top_k > 0 and p.temperature > 0 for p in params),
            any_top_p=any(p.top_p < 1 and p.temperature > 0 for p in params),
            any_penalty=any(p.repetition_penalty != 1 for p in params),
        )


@dataclass
class ModalityConstraint:
    """Tables for modality-constrained decoding: inside <soX> ... <eoX> only X's values and
    <eoX> are legal. State per row is an index into `allowed` (0 = no span open)."""

    allowed: torch.Tensor  # [1 + M, V] bool; row 0 allows everything
    opens: torch.Tensor  # [V] i64: state a token opens (its modality's row), else -1
    closes: torch.Tensor  # [1 + M] i64: the end token of each state (-1 for state 0)

    @classmethod
    def build(cls, vocab, device: torch.device, enabled: bool = True) -> "ModalityConstraint":
        names = vocab.modalities if enabled else ()
        allowed = torch.ones(1 + len(names), vocab.size, dtype=torch.bool)
        opens = torch.full((vocab.size,), -1, dtype=torch.int64)
        closes = torch.full((1 + len(names),), -1, dtype=torch.int64)
        for state, name in enumerate(names, start=1):
            span = vocab.span(name)
            allowed[state] = False
            allowed[state, span.first_value:span.first_value + span.num_values] = True
            allowed[state, span.end_token] = True
            opens[span.start_token] = state
            closes[state] = span.end_token
        return cls(allowed.to(device), opens.to(device), closes.to(device))

    def state_after(self, tokens: list[int]) -> int:
        """Constraint state after a host-side token sequence (e.g. a prompt ending in <sosp>)."""
        opens, closes = self.opens.tolist(), self.closes.tolist()
        state = 0
        for t in tokens:
            if opens[t] >= 0:
                state = opens[t]
            elif state and t == closes[state]:
                state = 0
        return state

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        opened = self.opens[tokens]
        closed = tokens == self.closes[state]
        return torch.where(opened >= 0, opened, torch.where(closed, torch.zeros_like(state), state))


def process_logits(logits: torch.Tensor, st: SamplingTensors, constraint: ModalityConstraint) -> torch.Tensor:
    """Repetition penalty and masks (transformers' logits processors) on float32 logits [B, V]."""
    if st.any_penalty:
        p = st.repetition_penalty.unsqueeze(1)
        penalized = torch.where(logits < 0, logits * p, logits / p)
        logits = torch.where(st.seen, penalized, logits)
    illegal = ~constraint.allowed[st.open_modality]
    illegal |= st.stop_mask & (st.generated < st.min_new_tokens).unsqueeze(1)
    return logits.masked_fill(illegal, -math.inf)


def warp_logits(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Temperature, top-k, top-p (transformers' warpers, with their tie and keep-one rules)."""
    greedy = st.temperature == 0
    temperature = torch.where(greedy, torch.ones_like(st.temperature), st.temperature)
    scores = logits / temperature.unsqueeze(1)
    vocab = scores.shape[1]
    if st.any_top_k:
        # Keep every token >= the k-th largest (ties included), as TopKLogitsWarper does.
        k = torch.where(st.top_k > 0, st.top_k.clamp(max=vocab), torch.full_like(st.top_k, vocab))
        kth = scores.sort(dim=1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        scores = scores.masked_fill(scores < kth, -math.inf)
    if st.any_top_p:
        # Drop the low tail whose cumulative probability is <= 1 - top_p; keep at least one.
        ascending, order = scores.sort(dim=1)
        cumulative = ascending.softmax(dim=1).cumsum(dim=1)
        drop_sorted = cumulative <= (1 - st.top_p).unsqueeze(1)
        drop_sorted[:, -1] = False
        scores = scores.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), -math.inf)
    return scores


def sample(logits: torch.Tensor, st: SamplingTensors, constraint: ModalityConstraint) -> torch.Tensor:
    """Next token per row [B] (int64) from float32 logits [B, V]; advances the state in place."""
    processed = process_logits(logits, st, constraint)
    if st.any_random:
        noise = uniform_noise(st.seeds, st.generated, logits.shape[1])
        gumbel = -torch.log(-torch.log(noise))
        processed = torch.where((st.temperature == 0).unsqueeze(1), processed, warp_logits(processed, st) + gumbel)
    tokens = processed.argmax(dim=1)
    st.seen.scatter_(1, tokens.unsqueeze(1), True)
    st.open_modality.copy_(constraint.advance(st.open_modality, tokens))
    st.generated += 1
    return tokens
