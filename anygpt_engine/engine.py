"""The engine: a model, its vocabulary and weights on a device, a paged KV cache, a
continuous-batching scheduler, and (on CUDA) decode steps replayed as CUDA graphs.

    engine = Engine("anygpt-7b")                       # preset, random bf16 weights on a GPU
    engine = Engine("/ckpt/AnyGPT-base")               # HF checkpoint directory
    outs = engine.generate([[1, 32000, ...]], SamplingParams.anygpt("speech"))

    rid = engine.add_request(prompt_ids, params)       # serving loop
    while engine.has_unfinished():
        for out in engine.step(): ...                  # out.new_token_ids, out.finished

Each step decodes one token for every running request and spends the rest of its token
budget on prefill chunks, packed into one forward (varlen attention keeps each chunk to its
own sequence). The decode step (embedding through sampling) is device-only work;
the host reads the sampled ids once per step to update the requests. Nothing is global:
engines with different models coexist in one process.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch

from anygpt_engine.config import ANYGPT_VOCAB_SIZE, PRESETS, ModelConfig
from anygpt_engine.models.llama import Llama, PrefillRuns
from anygpt_engine.profiling import nvtx_range
from anygpt_engine.quantization import check_mode
from anygpt_engine.runtime.beams import BeamGroup, BeamSearch
from anygpt_engine.runtime.graphs import DecodeGraphs, DecodeInputs, buckets
from anygpt_engine.runtime.kv_cache import BlockManager, PagedKVCache
from anygpt_engine.runtime.scheduler import PrefillChunk, Request, Scheduler
from anygpt_engine.runtime import warmup
from anygpt_engine.sampling import (MAX_LOGPROBS, ModalityConstraint, SamplerWork, SamplingParams, SamplingState,
                                    sample)
from anygpt_engine.tokenizer import Tokenizer
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
class TokenLogprobs:
    """A sampled token's log-probability and the most likely alternatives (SamplingParams.logprobs)."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass
class RequestOutput:
    request_id: object
    new_token_ids: list[int]  # this step's tokens (one; none for an abort; a beam search's best sequence at its end)
    finished: bool
    finish_reason: str | None  # "stop" (a stop token), "length" (max_new_tokens or context), "abort"
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when the request asked for them


@dataclass
class EngineStats:
    total_blocks: int
    free_blocks: int
    cached_blocks: int
    used_blocks: int
    running: int
    waiting: int
    prefix_cache_hit_rate: float  # prompt tokens found in the cache / prompt tokens admitted
    prefix_hits: int  # those two token counts
    prefix_queries: int
    preemptions: int
    graphs: int
    graph_capture_s: float
    graph_buckets_used: list  # (batch, block-table width) buckets replayed so far


def _padded_rows(rows: list[list[int]], width: int) -> torch.Tensor:
    """int64 [len(rows), width] of the rows zero-padded, through one flat array: a tensor of a
    nested list took a millisecond a decode step at batch 32 and 3,500-token contexts."""
    zeros = [0] * width
    flat = array("q")
    for row in rows:
        flat.extend(row)
        flat.extend(zeros[:width - len(row)])
    return torch.frombuffer(flat, dtype=torch.int64).view(len(rows), width)


class Engine:
    """Runs one AnyGPT-style backbone. See the module docstring.

    quantization: None, "int8", "fp8" or "int4": weight-only quantization of the layers' matrices
    at load (anygpt_engine/quantization.py); the embedding and the output head stay 16-bit.

    KV cache: `num_blocks` blocks of `block_size` tokens; without `num_blocks`, a CUDA engine
    takes `kv_cache_memory_fraction` of the free GPU memory (capped at what max_batch_size
    full-length sequences need) and a CPU engine exactly that cap.

    tensor_parallel_size=N > 1: this process is one rank of a torch.distributed group (the world
    group, or `process_group`) and holds one shard of the weights and of the KV cache
    (models/tensor_parallel.py); anygpt_engine.distributed drives the ranks (docs/distributed.md).

    warm_up (default: on CUDA): run the prefill and sampling shapes serving meets at start-up,
    so Triton never compiles mid-serving (Engine.warm_up; `warm_up_summary` says what ran).
    """

    def __init__(self, model: str | os.PathLike | ModelConfig = "tiny", weights=None, device=None, dtype=None, *,
                 vocab: Vocabulary | None = None, tokenizer: Tokenizer | str | os.PathLike | None = None,
                 constrain_modalities: bool = True, seed: int = 0,
                 block_size: int = 16, num_blocks: int | None = None, kv_cache_memory_fraction: float = 0.4,
                 max_batch_size: int = 32, max_num_batched_tokens: int = 4096, enable_prefix_caching: bool = True,
                 cuda_graphs: bool | None = None, quantization: str | None = None, tensor_parallel_size: int = 1,
                 process_group=None, warm_up: bool | None = None):
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
        for name, value in (("max_batch_size", max_batch_size), ("max_num_batched_tokens", max_num_batched_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}, expected a positive int")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 \
                or block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size!r}, expected a power of two")
        if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) \
                or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size!r}, expected a positive int")
        if not 0 < kv_cache_memory_fraction < 1:
            raise ValueError(f"kv_cache_memory_fraction={kv_cache_memory_fraction}, expected 0 < fraction < 1")
        self.quantization = check_mode(quantization)
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r}, but torch sees no CUDA device")
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = resolve_dtype(dtype)

        self.tensor_parallel_size = tensor_parallel_size
        source = weights if weights is not None else checkpoint
        if tensor_parallel_size == 1:
            self.model = Llama(config, device=self.device, dtype=self.dtype)
            if isinstance(source, dict):
                source = source.items()
        else:  # this rank's shard (models/tensor_parallel.py); anygpt_engine.distributed drives the ranks
            from anygpt_engine.models.tensor_parallel import Shard, TensorParallelLlama, sharded_tensors

            shard = Shard.join(config, tensor_parallel_size, process_group)
            self.model = TensorParallelLlama(config, shard, device=self.device, dtype=self.dtype)
            if source is not None:
                source = sharded_tensors(source, shard)
        if source is None:
            self.model.init_random(seed)
        else:
            load_into(self.model, self.model.config, source)
        if self.quantization is not None:  # weight-only, from the loaded 16-bit matrices
            self.model.quantize(self.quantization)
        self.model.eval()

        # Text prompts: the checkpoint's tokenizer, or one given (a preset has none by default).
        self.tokenizer = tokenizer = Tokenizer.for_model(tokenizer, checkpoint, config.vocab_size)

        if vocab is None:
            vocab = self._default_vocab(checkpoint or (tokenizer.path if tokenizer is not None else None))
        if vocab.size > config.vocab_size:
            raise ValueError(f"vocab has {vocab.size} ids but the model's vocab_size is {config.vocab_size}")
        self.vocab = vocab
        self.constraint = ModalityConstraint.build(Vocabulary(config.vocab_size, vocab.spans, vocab.special),
                                                   self.device, enabled=constrain_modalities)
        self._every_head_row = torch.tensor([0, config.vocab_size], device=self.device)  # (first, count)
        self._seeds = random.Random(seed)
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._requests: dict[object, Request] = {}
        self._aborted: list[RequestOutput] = []

        self.block_size = block_size
        blocks_per_seq = -(-config.max_seq_len // block_size)
        if num_blocks is None:
            num_blocks = self._default_num_blocks(blocks_per_seq * max_batch_size + 1, kv_cache_memory_fraction)
        self.kv_cache = PagedKVCache(self.model.config, num_blocks, block_size, self.device, self.dtype)
        self._scheduling = (num_blocks, block_size, enable_prefix_caching, max_batch_size, max_num_batched_tokens)
        # One sampling slot per schedulable row plus a scratch slot for padding and beam rows.
        self.scratch_slot = max_batch_size
        self.sampling_state = SamplingState(max_batch_size + 1, config.vocab_size, self.device)
        self.sampling_state.assign(self.scratch_slot, SamplingParams.greedy(), 0, [], (), 0)
        self.graphs = None
        self._reset_bookkeeping()  # the scheduler, block manager, beam search and counters
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        self.warm_up_summary = None
        if warm_up if warm_up is not None else self.device.type == "cuda":
            # Before the capture: its decode steps run eagerly, so every tensor-parallel rank
            # samples from its own requests' state (a follower's graphs do not sample).
            with self.model.in_lockstep() if tensor_parallel_size > 1 else contextlib.nullcontext():
                self.warm_up_summary = self.warm_up()
        if cuda_graphs:
            self.graphs = self._capture_decode_graphs(max_batch_size, blocks_per_seq)

    def warm_up(self) -> warmup.WarmUp:
        """Runs the prefill and sampling shapes serving will meet, so Triton compiles now rather
        than mid-serving (runtime/warmup.py); then the engine's bookkeeping starts fresh. Needs an
        idle engine. Engine(..., warm_up=True), the default on CUDA, calls it at start-up
        (tensor-parallel ranks in lockstep, before any rank leads)."""
        return warmup.warm_up(self)

    def _reset_bookkeeping(self) -> None:
        """A fresh scheduler and block manager (every block free, nothing cached) and counters."""
        num_blocks, block_size, prefix_caching, max_batch_size, max_tokens = self._scheduling
        self.scheduler = Scheduler(BlockManager(num_blocks, block_size, prefix_caching), max_batch_size, max_tokens)
        self.beam_search = BeamSearch(self.scheduler.blocks, self.sampling_state, self.constraint)
        self.head_rows_read = 0  # LM head rows read by decode steps, summed over their requests
        if self.graphs is not None:
            self.graphs.used.clear()

    def _capture_decode_graphs(self, max_batch_size: int, blocks_per_seq: int) -> DecodeGraphs:
        """A graph per (batch, block-table width) bucket. Tensor-parallel ranks capture in
        lockstep: each makes the same calls itself, so the warm-up runs' collectives meet their
        peers and each rank's graphs hold its all-reduces; rank 0 then publishes every replay's
        inputs (anygpt_engine.distributed)."""
        widths = [w for w in buckets(blocks_per_seq, start=8) if w <= blocks_per_seq] or [blocks_per_seq]
        if widths[-1] < blocks_per_seq:
            widths.append(blocks_per_seq)
        tensor_parallel = self.tensor_parallel_size > 1
        step = self._decode_forward
        if tensor_parallel and self.model.shard.rank != 0:
            # A follower's steps feed only the collectives: rank 0 samples (and holds the requests' sampling state).
            def step(inputs):
                return self._decode_forward(inputs, None)[1:]
        with torch.inference_mode(), self.model.in_lockstep() if tensor_parallel else contextlib.nullcontext():
            # thread_local: the process group's watchdog thread may query events while we capture
            return DecodeGraphs(step, buckets(max_batch_size), widths, self.scratch_slot, self.config.vocab_size,
                                self.device, capture_error_mode="thread_local" if tensor_parallel else "global")

    def _default_vocab(self, checkpoint: Path | None) -> Vocabulary:
        if checkpoint is not None:
            try:
                return Vocabulary.from_pretrained(checkpoint)
            except FileNotFoundError:
                pass
        if self.config.vocab_size >= ANYGPT_VOCAB_SIZE:
            return Vocabulary.anygpt()
        return Vocabulary.text_only(self.config.vocab_size)

    def _default_num_blocks(self, enough: int, fraction: float) -> int:
        if self.device.type != "cuda":
            return enough
        free, _ = torch.cuda.mem_get_info(self.device)
        per_block = PagedKVCache.bytes_per_block(self.model.config, self.block_size, self.dtype)
        return max(2, min(enough, int(free * fraction) // per_block))

    def __repr__(self) -> str:
        c = self.config
        return (f"Engine({c.name}: {c.num_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, "
                f"{self.dtype}, {self.device}, {self.kv_cache.num_blocks} KV blocks of {self.block_size})")

    # -- inputs --------------------------------------------------------------------------------
    def _prompt(self, name: str, ids) -> list[int]:
        if isinstance(ids, str):
            if self.tokenizer is None:
                raise TypeError(f"{name} is a string but this engine has no tokenizer; pass token ids, or build it "
                                "from a checkpoint directory with tokenizer files or with Engine(..., tokenizer=DIR)")
            ids = self.tokenizer.encode(ids)
        prompt = token_ids(name, ids, self.config.vocab_size)
        if len(prompt) >= self.config.max_seq_len:
            raise ValueError(f"{name} has {len(prompt)} tokens; the context holds {self.config.max_seq_len}, "
                             "so a prompt may have at most max_seq_len - 1")
        return prompt

    # -- scoring -------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, prompt_ids) -> torch.Tensor:
        """float32 logits [len, vocab] of every prompt position (position i predicts token i+1).
        Uses a private cache, so it never disturbs running requests."""
        return self.model.head(self._prompt_states(self._prompt("prompt_ids", prompt_ids)), self._every_head_row)

    def _prompt_states(self, prompt: list[int]) -> torch.Tensor:
        """The hidden states [len, hidden] of a checked prompt (for model.head), through a private cache."""
        n = len(prompt)
        num_blocks = -(-n // self.block_size)
        kv = PagedKVCache(self.model.config, num_blocks + 1, self.block_size, self.device, self.dtype)
        table = torch.arange(1, num_blocks + 1, device=self.device).unsqueeze(0)
        positions = torch.arange(n, device=self.device).unsqueeze(0)
        slot_mapping = table[0, positions // self.block_size] * self.block_size + positions % self.block_size
        return self.model(torch.tensor([prompt], device=self.device), positions, kv.layers, slot_mapping, table)[0]

    # -- serving API ---------------------------------------------------------------------------
    def add_request(self, prompt_ids, params: SamplingParams | None = None, request_id=None):
        """Queues a request; returns its id (given, or a fresh int). Raises for bad input and for
        a request that could never fit in the KV cache."""
        prompt = self._prompt("prompt_ids", prompt_ids)
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        bad = [t for t in (params.stop_token_ids or ()) if t >= self.config.vocab_size]
        if bad:
            raise ValueError(f"params.stop_token_ids has {bad}, outside the vocabulary (size {self.config.vocab_size})")
        if request_id is None:
            request_id = next(self._ids)
            while request_id in self._requests:
                request_id = next(self._ids)
        elif request_id in self._requests:
            raise ValueError(f"request_id={request_id!r} is already in use")
        if params.num_beams > self.scheduler.max_batch_size:
            raise ValueError(f"params.num_beams={params.num_beams}, but the engine decodes at most max_batch_size="
                             f"{self.scheduler.max_batch_size} rows")
        max_new = min(params.max_new_tokens, self.config.max_seq_len - len(prompt))
        blocks = self.scheduler.blocks
        need = blocks.blocks_for(len(prompt) + max_new)
        if params.num_beams > 1:  # beams share the prompt's full blocks; each may own all the rest
            shared = len(prompt) // blocks.block_size
            need = shared + params.num_beams * (need - shared)
        if need > blocks.usable_blocks:
            raise ValueError(f"request needs {need} KV blocks ({len(prompt)} prompt + {max_new} new tokens) but the "
                             f"cache has {blocks.usable_blocks}; lower max_new_tokens or give the engine more blocks")
        stops = params.stop_token_ids if params.stop_token_ids is not None else (self.config.eos_token_id,)
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        request = Request(request_id, prompt, params, seed, frozenset(stops), max_new, next(self._arrivals),
                          self.constraint.state_after(prompt))
        if params.num_beams > 1:
            request.width, request.beams = params.num_beams, BeamGroup(request, params)
        self._requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def abort(self, request_id) -> bool:
        """Ends a request now; the next step() reports it with finish_reason 'abort'. Returns
        False, and does nothing, for a request that has already finished or never existed (a
        caller aborting on disconnect may race the request's last step)."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._finish(request, "abort")
        self._aborted.append(RequestOutput(request_id, [], True, "abort"))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    def stats(self) -> EngineStats:
        blocks = self.scheduler.blocks
        return EngineStats(
            total_blocks=blocks.usable_blocks, free_blocks=blocks.num_free(), cached_blocks=blocks.num_cached(),
            used_blocks=blocks.num_used(), running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            prefix_cache_hit_rate=blocks.hit_rate(), prefix_hits=blocks.hit_tokens,
            prefix_queries=blocks.queried_tokens, preemptions=self.scheduler.num_preemptions,
            graphs=len(self.graphs) if self.graphs else 0,
            graph_capture_s=self.graphs.capture_seconds if self.graphs else 0.0,
            graph_buckets_used=sorted(self.graphs.used) if self.graphs else [],
        )

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One scheduling round: decode every running request, prefill what the budget allows."""
        with nvtx_range("anygpt/step"):
            outputs, self._aborted = self._aborted, []
            schedule = self.scheduler.schedule()
            for request in schedule.new_slots:
                self.sampling_state.assign(request.slot, request.params, request.seed, request.prompt,
                                           tuple(request.stop_ids), self.constraint.state_after(request.prompt))
            self.kv_cache.copy_blocks(self.scheduler.blocks.take_copies())
            sampled: list[tuple[Request, int]] = []
            logprobs: dict[object, TokenLogprobs] = {}  # by request id
            beam_groups, beam_logits = [], []
            if schedule.decodes:
                tokens, logits = self._decode(schedule.decodes)
                row, asked = 0, []
                for request in schedule.decodes:
                    rows = len(request.seq_ids)
                    if request.beams is None:
                        sampled.append((request, tokens[row]))
                        if request.params.logprobs is not None:
                            asked.append((row, request, tokens[row]))
                    else:
                        beam_groups.append(request.beams)
                        beam_logits.append(logits[row:row + rows])
                    row += rows
                logprobs.update(self._logprobs(logits, asked))
            requests, last_logits = self._prefill(schedule.prefills)
            plain = [i for i, r in enumerate(requests) if r.beams is None]
            if plain:
                slots = torch.tensor([requests[i].slot for i in plain], device=self.device)
                with nvtx_range("anygpt/sample"):
                    tokens = sample(last_logits[plain], slots, self.sampling_state, self.constraint,
                                    SamplerWork.for_params([requests[i].params for i in plain]))
                tokens = tokens.tolist()
                sampled += zip([requests[i] for i in plain], tokens)
                logprobs.update(self._logprobs(last_logits, [(i, requests[i], token) for i, token in zip(plain, tokens)
                                                             if requests[i].params.logprobs is not None]))
            for i, request in enumerate(requests):
                if request.beams is not None:
                    beam_groups.append(request.beams)
                    beam_logits.append(last_logits[i:i + 1])
            if beam_groups:
                with nvtx_range("anygpt/beam_search"):
                    for group in self.beam_search.advance(beam_groups, torch.cat(beam_logits)):
                        tokens, reason = group.result()
                        self._finish(group.request, reason)
                        outputs.append(RequestOutput(group.request.request_id, tokens, True, reason))
            for request, token in sampled:
                outputs.append(self._append(request, token, logprobs.get(request.request_id)))
            return outputs

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *,
                 return_tensors: bool = False) -> list:
        """Generated ids for each prompt: lists of ints (or 1-D int64 tensors). A sampled stop
        token ends its request and is included. Drives the engine until these requests end, so
        it needs an engine with no other requests in flight."""
        if self.has_unfinished():
            raise RuntimeError("generate() drives the engine itself; finish or abort the requests added with "
                               "add_request() first")
        if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
            prompts = list(prompts)
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id sequences")
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params must be one SamplingParams or a list of {len(prompts)}, got {len(params)}")
        # Validate everything before queueing anything, so a bad prompt leaves the engine idle.
        checked = [self._prompt(f"prompts[{i}]", p) for i, p in enumerate(prompts)]
        ids = []
        try:
            for prompt, p in zip(checked, params):
                ids.append(self.add_request(prompt, p))
        except (ValueError, TypeError):
            for rid in ids:
                self.abort(rid)
            self._aborted.clear()
            raise
        results = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id].extend(out.new_token_ids)
        outs = [results[rid] for rid in ids]
        return [torch.tensor(o, dtype=torch.int64) for o in outs] if return_tensors else outs

    # -- execution -----------------------------------------------------------------------------
    def _slot_of(self, table: list[int], position: int) -> int:
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def _prefill(self, chunks: list[PrefillChunk]) -> tuple[list[Request], torch.Tensor | None]:
        """Runs this step's prefill chunks packed into one forward (each chunk a run of the
        varlen attention over its own sequence). Returns the requests whose prompt (or
        recomputed context) is now complete, and float32 logits [n, V] of their last tokens,
        to be sampled."""
        if not chunks:
            return [], None
        tokens, positions, slots, tables, cu, last = [], [], [], [], [0], []
        for chunk in chunks:
            request = chunk.request
            table = self.scheduler.blocks.tables[request.request_id].blocks
            span = range(chunk.start, chunk.end)
            tokens += request.tokens[chunk.start:chunk.end]
            positions += span
            slots += [self._slot_of(table, p) for p in span]
            tables.append(table[:-(-chunk.end // self.block_size)])
            cu.append(cu[-1] + len(span))
            if chunk.is_last:
                last.append(cu[-1] - 1)
        width = max(len(t) for t in tables)
        device = self.device
        runs = PrefillRuns(
            cu_seqlens_q=torch.tensor(cu, device=device),
            kv_lens=torch.tensor([chunk.end for chunk in chunks], device=device),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device),
            max_q_len=max(chunk.end - chunk.start for chunk in chunks),
            fresh=all(chunk.start == 0 for chunk in chunks),
        )
        with nvtx_range("anygpt/prefill"):
            h = self.model(torch.tensor([tokens], device=device), torch.tensor([positions], device=device),
                           self.kv_cache.layers, torch.tensor([slots], device=device), runs.block_tables,
                           runs=runs)
            finished = []
            for chunk in chunks:
                request = chunk.request
                request.num_computed = chunk.end
                self.scheduler.blocks.commit(request.request_id, request.tokens[:chunk.end])
                if chunk.is_last:
                    request.prefilled = True
                    finished.append(request)
            if not finished:
                return [], None
            return finished, self.model.head(h[0, torch.tensor(last, device=device)], self._every_head_row)

    def _decode_forward(self, inputs: DecodeInputs,
                        work: SamplerWork | None = SamplerWork.ALL) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Embedding through sampling for one token per row: device work only (graph-safe).
        Returns the sampled ids and the float32 logits (beam search reads its rows'); work
        None skips the sampler (an eager step whose rows are all beams)."""
        x = self.model(inputs.tokens.unsqueeze(1), inputs.positions.unsqueeze(1), self.kv_cache.layers,
                       inputs.slot_mapping.unsqueeze(1), inputs.block_tables)
        logits = self.model.head(x[:, -1], inputs.head_rows)
        if work is None:
            return None, logits
        with nvtx_range("anygpt/sample"):
            return sample(logits, inputs.slots, self.sampling_state, self.constraint, work), logits

    def _decode(self, requests: list[Request]) -> tuple[list[int], torch.Tensor]:
        """One decode step of every sequence of `requests` (a beam search request has a row
        per live beam, sampled into the scratch slot): the sampled ids and logits per row."""
        rows = []  # (block-table key, tokens, sampling slot)
        for r in requests:
            if r.beams is None:
                rows.append((r.request_id, r.tokens, r.slot))
            else:
                rows += [(seq_id, tokens, self.scratch_slot) for seq_id, tokens in r.beams.sequences()]
        tables = [self.scheduler.blocks.tables[seq_id].blocks for seq_id, _, _ in rows]
        width = max(len(t) for t in tables)
        positions = [len(tokens) - 1 for _, tokens, _ in rows]
        host = DecodeInputs(
            tokens=torch.tensor([tokens[-1] for _, tokens, _ in rows]),
            positions=torch.tensor(positions),
            slot_mapping=torch.tensor([self._slot_of(t, p) for t, p in zip(tables, positions)]),
            block_tables=_padded_rows(tables, width),
            slots=torch.tensor([slot for _, _, slot in rows]),
            head_rows=torch.tensor(self._head_rows(requests)),
        )
        with nvtx_range("anygpt/decode_step"):
            if self.graphs is not None:
                sampled, logits = self.graphs.run(host)
            else:
                device_inputs = DecodeInputs(**{k: v.to(self.device) for k, v in vars(host).items()})
                plain = [r.params for r in requests if r.beams is None]
                sampled, logits = self._decode_forward(device_inputs,
                                                       SamplerWork.for_params(plain) if plain else None)
            # Host bookkeeping while the device runs the step; reading the sampled ids waits for it.
            for request in requests:
                request.num_computed += request.beams is None
            for seq_id, tokens, _ in rows:
                self.scheduler.blocks.commit(seq_id, tokens)
            return (sampled.tolist() if sampled is not None else []), logits

    def _head_rows(self, requests: list[Request]) -> tuple[int, int]:
        """The LM head rows a decode batch needs: one open modality's span when every request is
        inside the same one, else the whole vocabulary (the sampler masks what is illegal; beam
        search normalises its log-probs over the whole vocabulary)."""
        states = {r.modality if r.beams is None else 0 for r in requests}
        rows = self.constraint.head_rows[states.pop()] if len(states) == 1 else self.constraint.head_rows[0]
        self.head_rows_read += rows[1] * len(requests)
        return rows

    def _logprobs(self, logits: torch.Tensor | None, asked: list[tuple[int, Request, int]]) -> dict:
        """TokenLogprobs (by request id) of (logits row, request, sampled token) triples."""
        if not asked:
            return {}
        rows = torch.tensor([row for row, _, _ in asked], device=self.device)
        entries = self._token_logprobs(logits[rows], [request.modality for _, request, _ in asked],
                                       [token for _, _, token in asked],
                                       [request.params.logprobs for _, request, _ in asked])
        return {request.request_id: entry for (_, request, _), entry in zip(asked, entries)}

    def _token_logprobs(self, logits: torch.Tensor, states: list[int], tokens: list[int],
                        tops: list[int]) -> list[TokenLogprobs]:
        """Row i: a log-softmax of logits[i] over the tokens legal in modality state states[i],
        read at tokens[i] and at its tops[i] likeliest tokens (SamplingParams.logprobs)."""
        with nvtx_range("anygpt/logprobs"):
            legal = self.constraint.allowed[torch.tensor(states, device=self.device)]
            x = logits.float().masked_fill(~legal, -math.inf).log_softmax(-1)
            chosen = x.gather(1, torch.tensor(tokens, device=self.device).unsqueeze(1))[:, 0].tolist()
            k = max(tops)
            top_values, top_ids = (t.tolist() for t in x.topk(k, dim=-1)) if k else ([[]] * len(tokens),) * 2
        return [TokenLogprobs(token, logprob, [(i, v) for i, v in zip(ids[:n], values[:n]) if v > -math.inf])
                for token, logprob, values, ids, n in zip(tokens, chosen, top_values, top_ids, tops)]

    @torch.inference_mode()
    def prompt_logprobs(self, prompt_ids, top: int = 0, rows_per_chunk: int = 256) -> list[TokenLogprobs | None]:
        """Each prompt token's TokenLogprobs given the tokens before it (None for the first), with
        `top` alternatives: the same distribution as SamplingParams.logprobs (for scoring, e.g.
        OpenAI's echo). Uses a private cache, like logits(), and reads the LM head
        `rows_per_chunk` positions at a time, so a long prompt never holds [len, vocab] logits."""
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS:
            raise ValueError(f"top={top!r}, expected an int in 0..{MAX_LOGPROBS}")
        prompt = self._prompt("prompt_ids", prompt_ids)
        if len(prompt) == 1:
            return [None]
        states, state = [], 0
        for token in prompt[:-1]:
            state = self.constraint.state_after([token], state)
            states.append(state)
        hidden = self._prompt_states(prompt)[:-1]
        out = [None]
        for start in range(0, len(prompt) - 1, rows_per_chunk):
            end = min(start + rows_per_chunk, len(prompt) - 1)
            out += self._token_logprobs(self.model.head(hidden[start:end], self._every_head_row), states[start:end],
                                        prompt[start + 1:end + 1], [top] * (end - start))
        return out

    def _append(self, request: Request, token: int, logprobs: TokenLogprobs | None = None) -> RequestOutput:
        request.output.append(token)
        request.modality = self.constraint.state_after([token], request.modality)
        reason = None
        if token in request.stop_ids:
            reason = "stop"
        elif len(request.output) >= request.max_new:
            reason = "length"
        if reason:
            self._finish(request, reason)
        return RequestOutput(request.request_id, [token], reason is not None, reason,
                             [logprobs] if logprobs is not None else None)

    def _finish(self, request: Request, reason: str) -> None:
        request.finished, request.finish_reason = True, reason
        self.scheduler.remove(request)
        del self._requests[request.request_id]
