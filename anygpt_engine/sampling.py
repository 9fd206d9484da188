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
from dataclasses import dataclass

import torch

_ANYGPT_PRESETS = {
    # AnyGPT's config/*_generate_config.json (do_sample; transformers' default top_k=50 applies
    # where the file sets none); min_new_tokens 10 throughout. "text" is the chat model's
    # generate_config.json (beam-sample: do_sample with 5 beams), "text-base" the base model's
    # text_generate_config.json.
    "text": dict(temperature=1.0, top_k=50, top_p=1.0, num_beams=5, max_new_tokens=500),
    "text-base": dict(temperature=1.0, top_k=50, max_new_tokens=100),
    "image": dict(temperature=1.0, top_k=50, max_new_tokens=200),
    "speech": dict(temperature=1.0, top_k=50, repetition_penalty=1.05, max_new_tokens=1500),
    "music": dict(temperature=1.0, top_k=200, repetition_penalty=1.15, max_new_tokens=2000),
}


ANYGPT_PRESETS = tuple(_ANYGPT_PRESETS)  # the names SamplingParams.anygpt takes

MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs bound)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 = greedy. top_k 0 = off. top_p 1 = off.

    stop_token_ids None means the model's eos; an empty tuple means never stop early.
    A sampled stop token ends the request and is included in its output (as transformers does).
    seed None draws a fresh seed when the request starts.

    num_beams > 1 is beam search (runtime/beams.py), transformers' semantics: temperature 0 is
    generate(num_beams=N, do_sample=False), temperature > 0 beam-sample (do_sample=True, with
    temperature, top_k and top_p as warpers). length_penalty divides a finished sequence's summed
    log-probabilities by its generated length ** length_penalty; early_stopping is True (stop
    once num_beams sequences finished), False (stop when no running beam can beat them at its
    current length) or "never" (at the best length a positive penalty allows).

    logprobs N (0..20): each new token comes with its log-probability and the N most likely
    tokens' (RequestOutput.logprobs), under the model's distribution over the tokens legal at
    that point (the modality constraint applies; penalties, temperature and truncation do not),
    so they never depend on the rest of the batch. Not with beam search.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] | None = None
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    logprobs: int | None = None

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
        if not -math.inf < number("length_penalty") < math.inf:
            raise ValueError(f"SamplingParams.length_penalty={self.length_penalty}, expected a finite number")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            raise ValueError(f"SamplingParams.early_stopping={self.early_stopping!r}, expected True, False or 'never'")
        for name, low in (("top_k", 0), ("min_new_tokens", 0), ("max_new_tokens", 1), ("num_beams", 1)):
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
        if self.logprobs is not None:
            if isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) \
                    or not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"SamplingParams.logprobs={self.logprobs!r}, expected None or an int in "
                                 f"0..{MAX_LOGPROBS}")
            if self.num_beams > 1:
                raise ValueError(f"SamplingParams.logprobs={self.logprobs} with num_beams={self.num_beams}: "
                                 "log-probabilities are returned for sampled tokens, not beam search")

    @classmethod
    def greedy(cls, max_new_tokens: int = 128, **kwargs) -> "SamplingParams":
        return cls(temperature=0.0, max_new_tokens=max_new_tokens, **kwargs)

    @classmethod
    def anygpt(cls, modality: str, **overrides) -> "SamplingParams":
        """AnyGPT's own generation config for 'text' (the chat model: beam-sample, 5 beams),
        'text-base' (the base model's text config), 'image', 'speech' or 'music'."""
        try:
            preset = _ANYGPT_PRESETS[modality]
        except KeyError:
            raise ValueError(f"modality={modality!r}, expected one of {sorted(_ANYGPT_PRESETS)}") from None
        return cls(**{"min_new_tokens": 10, **preset, **overrides})


# -- counter-based noise ---------------------------------------------------------------------
MASK32 = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors; products wrap mod 2^64, and only the
    low 32 bits are kept, so the result is the same on every device."""
    x = x & MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 in the open interval (0, 1): the top 23 bits, centred in their
    bucket. (With 24 bits the largest value would round up to 1.0 in float32, and Gumbel noise
    -log(-log(1)) = +inf would override the -inf of a masked token.)"""
    return ((bits >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """U(0, 1) noise [B, V] keyed by (seed, step, token id): batch composition never changes it."""
    token = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    key = hash32(hash32(seeds.unsqueeze(1) ^ 0x9E3779B9) + steps.unsqueeze(1) * 0x632BE5AB + 0x85EBCA6B)
    return unit_interval(hash32(key ^ hash32(token + 0x27D4EB2F).unsqueeze(0)))


# -- per-request sampling state ----------------------------------------------------------------
@dataclass(frozen=True)
class SamplerWork:
    """Which stages a batch needs, known on the host from its requests' params; skipping the
    rest never branches on device values. Captured graphs use ALL so any batch can replay."""

    random: bool = True
    top_k: bool = True
    top_p: bool = True
    penalty: bool = True

    @classmethod
    def for_params(cls, params: list[SamplingParams]) -> "SamplerWork":
        return cls(
            random=any(p.temperature > 0 for p in params),
            top_k=any(p.top_k > 0 and p.temperature > 0 for p in params),
            top_p=any(p.top_p < 1 and p.temperature > 0 for p in params),
            penalty=any(p.repetition_penalty != 1 for p in params),
        )


SamplerWork.ALL = SamplerWork()


@dataclass
class SamplingTensors:
    """One batch's rows of the sampling state (see SamplingState.rows)."""

    temperature: torch.Tensor  # [B] f32
    top_k: torch.Tensor  # [B] i64, 0 = off
    top_p: torch.Tensor  # [B] f32
    repetition_penalty: torch.Tensor  # [B] f32
    min_new_tokens: torch.Tensor  # [B] i64
    seeds: torch.Tensor  # [B] i64
    stop_mask: torch.Tensor  # [B, V] bool: tokens that end the request
    seen: torch.Tensor  # [B, V] bool: tokens in prompt or output (repetition penalty)
    generated: torch.Tensor  # [B] i64: tokens sampled so far (also the noise counter)
    open_modality: torch.Tensor  # [B] i64: index into the constraint table, 0 = no span open


class SamplingState:
    """Parameters and state of every live request, one fixed slot each, on the device.

    A request keeps its slot from admission to its end (preemption included), so a decode
    step only needs the slot ids of its rows: gathers and scatters at fixed addresses, which
    a CUDA graph can replay for any batch."""

    _FIELDS = (("temperature", torch.float32), ("top_k", torch.int64), ("top_p", torch.float32),
               ("repetition_penalty", torch.float32), ("min_new_tokens", torch.int64), ("seeds", torch.int64),
               ("generated", torch.int64), ("open_modality", torch.int64))

    def __init__(self, num_slots: int, vocab_size: int, device: torch.device):
        self.num_slots = num_slots
        self.vocab_size = vocab_size
        for name, dtype in self._FIELDS:
            setattr(self, name, torch.zeros(num_slots, dtype=dtype, device=device))
        self.stop_mask = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)
        self.seen = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)

    def assign(self, slot: int, params: SamplingParams, seed: int, prompt: list[int], stop_ids: tuple[int, ...],
               open_modality: int) -> None:
        """Initialises a slot for a new request (host to device; never inside a step)."""
        values = dict(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                      repetition_penalty=params.repetition_penalty, min_new_tokens=params.min_new_tokens,
                      seeds=seed & 0x7FFFFFFFFFFFFFFF, generated=0, open_modality=open_modality)
        for name, value in values.items():
            getattr(self, name)[slot] = value
        device = self.seen.device
        self.stop_mask[slot] = False
        if stop_ids:
            self.stop_mask[slot, torch.tensor(stop_ids, device=device)] = True
        self.seen[slot] = False
        if prompt:
            self.seen[slot, torch.tensor(prompt, device=device)] = True

    def rows(self, slots: torch.Tensor) -> SamplingTensors:
        return SamplingTensors(**{name: getattr(self, name)[slots] for name, _ in self._FIELDS},
                               stop_mask=self.stop_mask[slots], seen=self.seen[slots])

    def copy(self, dst: torch.Tensor, src: torch.Tensor, fields: tuple[str, ...] | None = None) -> None:
        """Slot dst[i] takes what slot src[i] holds (sources are read before any write, so dst
        and src may overlap): how a new beam inherits its parent's state. fields: the names to
        copy (default: parameters, stop mask and state, everything)."""
        names = fields if fields is not None else [name for name, _ in self._FIELDS] + ["stop_mask", "seen"]
        for name in names:
            field = getattr(self, name)
            field.index_copy_(0, dst, field.index_select(0, src))

    def append(self, slots: torch.Tensor, tokens: torch.Tensor, constraint: "ModalityConstraint") -> None:
        """Records tokens [B] chosen outside the sampler (beam search) as sample_tokens records
        the ones it draws: seen, open modality, generated count."""
        self.seen[slots, tokens] = True
        self.open_modality[slots] = constraint.advance(self.open_modality[slots], tokens)
        self.generated[slots] += 1


@dataclass
class ModalityConstraint:
    """Tables for modality-constrained decoding: inside <soX> ... <eoX> only X's values and
    <eoX> are legal. State per row is an index into `allowed` (0 = no span open)."""

    allowed: torch.Tensor  # [1 + M, V] bool; row 0 allows everything
    opens: torch.Tensor  # [V] i64: state a token opens (its modality's row), else -1
    closes: torch.Tensor  # [1 + M] i64: the end token of each state (-1 for state 0)
    head_rows: list[tuple[int, int]]  # per state, the LM head rows (first, count) holding its legal ids
    _host: tuple | None = None  # host copies of opens/closes, built on first use

    @classmethod
    def build(cls, vocab, device: torch.device, enabled: bool = True) -> "ModalityConstraint":
        names = vocab.modalities if enabled else ()
        allowed = torch.ones(1 + len(names), vocab.size, dtype=torch.bool)
        opens = torch.full((vocab.size,), -1, dtype=torch.int64)
        closes = torch.full((1 + len(names),), -1, dtype=torch.int64)
        head_rows = [(0, vocab.size)]
        for state, name in enumerate(names, start=1):
            span = vocab.span(name)
            allowed[state] = False
            allowed[state, span.first_value:span.first_value + span.num_values] = True
            allowed[state, span.end_token] = True
            opens[span.start_token] = state
            closes[state] = span.end_token
            legal = [span.first_value, span.first_value + span.num_values - 1, span.end_token]
            head_rows.append((min(legal), max(legal) - min(legal) + 1))
        return cls(allowed.to(device), opens.to(device), closes.to(device), head_rows)

    def state_after(self, tokens: list[int], state: int = 0) -> int:
        """Constraint state after host-side tokens (a prompt ending in <sosp>, a new token)."""
        if self._host is None:
            self._host = ({t: s for t, s in enumerate(self.opens.tolist()) if s >= 0}, self.closes.tolist())
        opens, closes = self._host
        for t in tokens:
            if t in opens:
                state = opens[t]
            elif state and t == closes[state]:
                state = 0
        return state

    def advance(self, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        opened = self.opens[tokens]
        closed = tokens == self.closes[state]
        return torch.where(opened >= 0, opened, torch.where(closed, torch.zeros_like(state), state))


def process_logits(logits: torch.Tensor, st: SamplingTensors, constraint: ModalityConstraint,
                   work: SamplerWork = SamplerWork.ALL) -> torch.Tensor:
    """Repetition penalty and masks (transformers' logits processors) on float32 logits [B, V]."""
    if work.penalty:
        p = st.repetition_penalty.unsqueeze(1)
        penalized = torch.where(logits < 0, logits * p, logits / p)
        logits = torch.where(st.seen, penalized, logits)
    illegal = ~constraint.allowed[st.open_modality]
    illegal |= st.stop_mask & (st.generated < st.min_new_tokens).unsqueeze(1)
    return logits.masked_fill(illegal, -math.inf)


def warp_logits(logits: torch.Tensor, st: SamplingTensors, work: SamplerWork = SamplerWork.ALL,
                min_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Temperature, top-k, top-p (transformers' warpers, with their tie and keep-one rules).
    min_keep [B] (default 1): tokens top-k and top-p always keep, transformers'
    min_tokens_to_keep (its beam-sample keeps one more than the number of eos tokens)."""
    greedy = st.temperature == 0
    temperature = torch.where(greedy, torch.ones_like(st.temperature), st.temperature)
    scores = logits / temperature.unsqueeze(1)
    vocab = scores.shape[1]
    if work.top_k:
        # Keep every token >= the k-th largest (ties included), as TopKLogitsWarper does.
        k = torch.where(st.top_k > 0, st.top_k.clamp(max=vocab), torch.full_like(st.top_k, vocab))
        if min_keep is not None:
            k = torch.maximum(k, min_keep).clamp(max=vocab)
        kth = scores.sort(dim=1, descending=True).values.gather(1, (k - 1).unsqueeze(1))
        scores = scores.masked_fill(scores < kth, -math.inf)
    if work.top_p:
        # Drop the low tail whose cumulative probability is <= 1 - top_p; keep at least min_keep.
        ascending, order = scores.sort(dim=1)
        cumulative = ascending.softmax(dim=1).cumsum(dim=1)
        drop_sorted = cumulative <= (1 - st.top_p).unsqueeze(1)
        if min_keep is None:
            drop_sorted[:, -1] = False
        else:
            position = torch.arange(vocab, device=scores.device)
            drop_sorted &= position.unsqueeze(0) < vocab - min_keep.unsqueeze(1)
        scores = scores.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), -math.inf)
    return scores


def sample(logits: torch.Tensor, slots: torch.Tensor, state: SamplingState, constraint: ModalityConstraint,
           work: SamplerWork = SamplerWork.ALL) -> torch.Tensor:
    """Next token [B] (int64) for the requests in `slots` [B] from float32 logits [B, V];
    advances their state. Device work only: safe inside a CUDA graph.

    Dispatches to ops.sample_tokens (fused kernels on a GPU; on a CPU the torch reference,
    ops.sampling.sample_tokens_reference, which is this module's processors and warpers)."""
    from anygpt_engine.ops.sampling import sample_tokens  # here: ops.sampling imports this module

    return sample_tokens(logits, slots, state, constraint, work)
