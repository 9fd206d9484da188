"""Fused sampling: logits [B, V] -> next token ids [B], with the per-request state updates.

Contract (row r of the batch, slot = slots[r], parameters and state read at that slot; the
reference is sampling.process_logits / warp_logits / uniform_noise, i.e. transformers'
processors and warpers in generate's order):
  x      = logits[r] (float32); NaN reads as -inf
  x_v    = x_v * penalty if x_v < 0 else x_v / penalty   where seen[slot, v]   (HF repetition penalty)
  x_v    = -inf where not allowed[open_modality[slot], v], or where stop_mask[slot, v] while
           generated[slot] < min_new_tokens[slot]
  greedy (temperature 0, or work.random False): token = first argmax of x
  else   s = x / temperature
         top-k (k > 0): drop s_v < the k-th largest s (ties at the k-th value are kept)
         top-p (p < 1): drop the ascending tail whose cumulative softmax mass is <= 1 - p;
                        here: keep s_v iff the mass of strictly larger scores is < p (ties at
                        the boundary are kept), so the row maximum always survives
         token = first argmax over the kept set of s_v + g_v, g = -log(-log(u)), u =
                 sampling.uniform_noise(seed, generated, V): the counter-based noise, so a
                 request draws the same tokens alone or in any batch
  then   seen[slot, token] = True; open_modality advanced (ModalityConstraint.advance);
         generated[slot] += 1; out[r] = token.
A row whose logits are all -inf (everything masked) gets token 0, as torch.argmax does; a +inf
logit wins (the first one). Rows that share a slot (CUDA-graph padding rows use one scratch
slot) get unspecified tokens among themselves; other rows are unaffected.

The kernels find the k-th value and the top-p threshold by a radix select on order-preserving
uint32 keys of the scores (no sort of the vocabulary), draw the noise in-kernel bit-exactly,
and never sync with the host: the op is CUDA-graph safe and writes into a preallocated `out`.
Where they may legitimately differ from the reference: the top-p mass is summed in another
order (a token whose cumulative mass is within float32 rounding of 1 - p may flip), ties at
the top-p boundary (all kept here; the reference keeps them by sort position), and the last
ulp of log() in the Gumbel noise (a near-tie of two noisy scores may flip).

Faces: torch reference (CPU path and oracle), Triton and CUDA C++; ops.backend.choose picks,
on a GPU in the order the tuning table (tuning/sampling.json, "preferred") names.
"""

from __future__ import annotations

import math

import torch

from anygpt_engine import tuning
from anygpt_engine.ops import backend as _backend
from anygpt_engine.ops._extension import cuda_stream_handle, extension, on_tensor_device
from anygpt_engine.ops.launches import record
from anygpt_engine.sampling import (ModalityConstraint, SamplerWork, SamplingState, process_logits, uniform_noise,
                                    warp_logits)

_SUPPORTED = ("torch", "triton", "cuda")
_STATE_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "min_new_tokens", "seeds", "generated",
                 "open_modality")


def sample_tokens_reference(logits: torch.Tensor, slots: torch.Tensor, state: SamplingState,
                            constraint: ModalityConstraint, work: SamplerWork = SamplerWork.ALL) -> torch.Tensor:
    """Readable torch version (the CPU path and the oracle): tokens [B]; advances the state."""
    logits = logits.masked_fill(torch.isnan(logits), -math.inf)
    st = state.rows(slots)
    processed = process_logits(logits, st, constraint, work)
    if work.random:
        noise = uniform_noise(st.seeds, st.generated, logits.shape[1])
        gumbel = -torch.log(-torch.log(noise))
        processed = torch.where((st.temperature == 0).unsqueeze(1), processed,
                                warp_logits(processed, st, work) + gumbel)
    tokens = processed.argmax(dim=1)
    state.seen[slots, tokens] = True
    state.open_modality[slots] = constraint.advance(st.open_modality, tokens)
    state.generated[slots] = st.generated + 1
    return tokens


# -- checks -----------------------------------------------------------------------------------
def _check(logits, slots, state, constraint, work, out):
    if not isinstance(state, SamplingState):
        raise TypeError(f"state must be a SamplingState, got {type(state).__name__}")
    if not isinstance(constraint, ModalityConstraint):
        raise TypeError(f"constraint must be a ModalityConstraint, got {type(constraint).__name__}")
    if not isinstance(work, SamplerWork):
        raise TypeError(f"work must be a SamplerWork, got {type(work).__name__}")
    for name, t in (("logits", logits), ("slots", slots)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    device = state.seen.device
    vocab = state.vocab_size
    if logits.dtype != torch.float32:
        raise TypeError(f"logits.dtype={logits.dtype}, expected torch.float32")
    if logits.dim() != 2 or logits.shape[1] != vocab:
        raise ValueError(f"logits.shape={tuple(logits.shape)}, expected [B, {vocab}] (the state's vocab_size)")
    if vocab > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must be contiguous along the vocabulary, got strides {logits.stride()}")
    if logits.device != device:
        raise ValueError(f"logits is on {logits.device}, expected {device} like the sampling state")
    b = logits.shape[0]
    if slots.dtype != torch.int64 or slots.shape != (b,) or not slots.is_contiguous():
        raise ValueError(f"slots: shape {tuple(slots.shape)}, dtype {slots.dtype}: expected a contiguous int64 [{b}] "
                         "(one state slot per logits row)")
    if slots.device != device:
        raise ValueError(f"slots is on {slots.device}, expected {device} like the sampling state")
    for name, t, dtype, shape in (("constraint.allowed", constraint.allowed, torch.bool, None),
                                  ("constraint.opens", constraint.opens, torch.int64, (vocab,)),
                                  ("constraint.closes", constraint.closes, torch.int64, None)):
        if t.device != device or t.dtype != dtype:
            raise ValueError(f"{name}: {t.dtype} on {t.device}, expected {dtype} on {device} like the sampling state")
        if shape is not None and t.shape != shape:
            raise ValueError(f"{name}.shape={tuple(t.shape)}, expected {shape}")
        if not t.is_contiguous():  # the kernels index the tables as dense arrays
            raise ValueError(f"{name} has strides {t.stride()}, expected a contiguous tensor")
    states = constraint.closes.shape[0] if constraint.closes.dim() == 1 else -1
    if constraint.allowed.shape != (states, vocab) or states < 1:
        raise ValueError(f"constraint.allowed.shape={tuple(constraint.allowed.shape)} and closes.shape="
                         f"{tuple(constraint.closes.shape)}: expected [1 + M, {vocab}] and [1 + M]")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if out.dtype != torch.int64 or out.shape != (b,) or out.device != device or not out.is_contiguous():
            raise ValueError(f"out: {out.dtype} {tuple(out.shape)} on {out.device}: expected a contiguous int64 "
                             f"[{b}] tensor on {device}")


def _check_values(logits, slots, state, constraint):
    """Checks of device values: a host sync, so only on request or for CPU tensors."""
    if slots.numel() and not bool(((slots >= 0) & (slots < state.num_slots)).all()):
        bad = slots[(slots < 0) | (slots >= state.num_slots)][0].item()
        raise ValueError(f"slots contains {bad}, expected slot ids in [0, {state.num_slots})")
    nan_rows = torch.isnan(logits).any(dim=1)
    if bool(nan_rows.any()):
        raise ValueError(f"logits row {int(nan_rows.nonzero()[0, 0])} contains NaN "
                         "(pass check_values=False to read NaN as -inf instead)")
    if not slots.numel():
        return
    rows = {name: getattr(state, name)[slots] for name in _STATE_FIELDS}
    problems = (("temperature", ~((rows["temperature"] >= 0) & (rows["temperature"] < math.inf)), ">= 0 and finite"),
                ("top_p", ~((rows["top_p"] > 0) & (rows["top_p"] <= 1)), "in (0, 1]"),
                ("top_k", rows["top_k"] < 0, ">= 0"),
                ("repetition_penalty", ~((rows["repetition_penalty"] > 0) & (rows["repetition_penalty"] < math.inf)),
                 "> 0 and finite"),
                ("open_modality", (rows["open_modality"] < 0) | (rows["open_modality"] >= constraint.closes.shape[0]),
                 f"in [0, {constraint.closes.shape[0]})"))
    for name, bad, expected in problems:
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"state.{name} of slot {int(slots[row])} (row {row}) is "
                             f"{getattr(state, name)[slots[row]].item()}, expected {expected}")


# -- the op -----------------------------------------------------------------------------------
def sample_tokens(logits: torch.Tensor, slots: torch.Tensor, state: SamplingState, constraint: ModalityConstraint,
                  work: SamplerWork = SamplerWork.ALL, *, out: torch.Tensor | None = None, backend: str | None = None,
                  check_values: bool | None = None) -> torch.Tensor:
    """Next token [B] (int64, written into `out` when given) for the requests in `slots` [B]
    from float32 logits [B, V]; advances their state (see the module docstring).

    `work` says which stages the batch needs (SamplerWork.for_params); a stage it switches
    off is skipped for every row. `check_values` also checks device values (slots in range,
    no NaN logits, the rows' parameters valid) and raises ValueError: a host sync, so by
    default (None) only for CPU tensors; on a GPU the kernels read NaN as -inf and write -1
    for an out-of-range slot, touching no state.
    """
    _check(logits, slots, state, constraint, work, out)
    device = logits.device
    if check_values or (check_values is None and device.type == "cpu"):
        _check_values(logits, slots, state, constraint)
    if out is None:
        out = torch.empty(logits.shape[0], dtype=torch.int64, device=device)
    if logits.shape[0] == 0:
        return out
    preferred = tuple(tuning.params("sampling", device)["preferred"]) if device.type == "cuda" else ()
    face = _backend.choose("sample_tokens", device, backend, preferred, _SUPPORTED)
    if face == "torch":
        return out.copy_(sample_tokens_reference(logits, slots, state, constraint, work))
    _sample_tokens_kernel(logits, slots, out, state.temperature, state.top_k, state.top_p, state.repetition_penalty,
                          state.min_new_tokens, state.seeds, state.generated, state.open_modality, state.stop_mask,
                          state.seen, constraint.allowed, constraint.opens, constraint.closes, work.random, work.top_k,
                          work.top_p, work.penalty, face)
    return out


@torch.library.custom_op("anygpt_engine::sample_tokens_kernel",
                         mutates_args=("out", "generated", "open_modality", "seen"))
@on_tensor_device
def _sample_tokens_kernel(logits: torch.Tensor, slots: torch.Tensor, out: torch.Tensor, temperature: torch.Tensor,
                          top_k: torch.Tensor, top_p: torch.Tensor, repetition_penalty: torch.Tensor,
                          min_new_tokens: torch.Tensor, seeds: torch.Tensor, generated: torch.Tensor,
                          open_modality: torch.Tensor, stop_mask: torch.Tensor, seen: torch.Tensor,
                          allowed: torch.Tensor, opens: torch.Tensor, closes: torch.Tensor, random: bool,
                          use_top_k: bool, use_top_p: bool, use_penalty: bool, face: str) -> None:
    """Launches one kernel face on checked arguments (registered so torch.compile sees it)."""
    record("sample_tokens")
    rows, vocab = logits.shape
    params = tuning.params("sampling", logits.device)
    # Per-row scores between the passes (L2-resident on a GPU); only sampled rows write theirs.
    scratch = torch.empty((rows, vocab) if random else (1, 1), dtype=torch.float32, device=logits.device)
    as_bytes = {name: t.view(torch.uint8) for name, t in (("stop", stop_mask), ("seen", seen), ("allowed", allowed))}
    if face == "triton":
        from anygpt_engine.kernels import sampling as triton_sampling

        triton_sampling.sample(logits, slots, out, scratch, temperature, top_k, top_p, repetition_penalty,
                               min_new_tokens, seeds, generated, open_modality, as_bytes["stop"], as_bytes["seen"],
                               as_bytes["allowed"], opens, closes, random=random, use_top_k=use_top_k,
                               use_top_p=use_top_p, use_penalty=use_penalty, block=params["triton_block"],
                               radix_bits=params["triton_radix_bits"], num_warps=params["triton_num_warps"])
        return
    extension().sample_tokens_cuda(
        logits.data_ptr(), logits.stride(0), slots.data_ptr(), out.data_ptr(), scratch.data_ptr(),
        temperature.data_ptr(), top_k.data_ptr(), top_p.data_ptr(), repetition_penalty.data_ptr(),
        min_new_tokens.data_ptr(), seeds.data_ptr(), generated.data_ptr(), open_modality.data_ptr(),
        stop_mask.data_ptr(), seen.data_ptr(), allowed.data_ptr(), opens.data_ptr(), closes.data_ptr(), rows, vocab,
        seen.shape[0], allowed.shape[0], random, use_top_k, use_top_p, use_penalty, params["cuda_threads"],
        cuda_stream_handle(logits.device))


@_sample_tokens_kernel.register_fake
def _(logits, slots, out, temperature, top_k, top_p, repetition_penalty, min_new_tokens, seeds, generated,
      open_modality, stop_mask, seen, allowed, opens, closes, random, use_top_k, use_top_p, use_penalty, face):
    return None
