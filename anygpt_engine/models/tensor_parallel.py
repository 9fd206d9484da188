"""Megatron-style tensor parallelism of the LLaMA backbone over a torch.distributed group.

Each of N ranks holds one shard of every matrix (Shard says which rows/columns):
  wqkv   column-parallel by heads: num_heads / N query heads; KV heads split N ways, or, when N
         exceeds them, the one KV head its query heads use (replicated on N / num_kv_heads ranks)
  w13    column-parallel: intermediate_size / N rows of gate and of up
  wo, w2 row-parallel: the matching columns; their partial outputs are summed by one
         all-reduce each (add_projection: before the residual add)
  tok_embeddings, output  vocabulary-parallel: ceil(V / N) rows each (the last rank zero-padded);
         the embedding is looked up locally and all-reduced, and the logits all-gathered before
         the sampler, so sampling sees the same [B, V] logits as one rank would
The KV cache follows the heads (a shard's config has its own num_kv_heads). Norms are whole.

A shard is a plain Llama over `Shard.local_config` plus the collectives: the sharded model is
this subclass, so models/llama.py stays the single readable forward. Weights are read per rank
by slicing (safetensors `get_slice`), never whole. A collective that fails names the rank that is
gone (pids gathered at start: a rank on this host is checked directly).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from datetime import timedelta
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from anygpt_engine.config import ModelConfig
from anygpt_engine import ops
from anygpt_engine.models.llama import Llama, PrefillRuns
from anygpt_engine.ops.lm_head import lm_head
from anygpt_engine.profiling import nvtx_range


class RankFailure(RuntimeError):
    """A tensor-parallel collective failed or timed out; the message names the rank(s) gone."""


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next((line.split()[1] for line in f if line.startswith("State:")), "?")
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent has not reaped it yet


@dataclass
class Shard:
    """Rank `rank` of `size` in `group`: the slice of every weight it holds, and its peers."""
    config: ModelConfig
    rank: int
    size: int
    group: object = None
    peers: list = field(default_factory=list)  # (hostname, pid) of every rank in the group
    store: object = None  # the launcher's key-value store, where a rank that timed out says so
    key: str = "anygpt/tp/0"
    plan_group: object = None  # gloo, no practical timeout: rank 0's step plans (anygpt_engine.distributed)
    timeout_s: float = 600.0  # the group's collective timeout (the launcher's), also bounding graph replays

    _joined = 0

    def __post_init__(self):
        c, n = self.config, self.size
        if c.num_heads % n:
            raise ValueError(f"tensor_parallel_size={n} does not divide num_heads={c.num_heads}")
        if c.num_kv_heads % n and n % c.num_kv_heads:
            raise ValueError(f"tensor_parallel_size={n} and num_kv_heads={c.num_kv_heads}: one must divide the "
                             "other (KV heads are split, or replicated when there are fewer than ranks)")
        if c.intermediate_size % n:
            raise ValueError(f"tensor_parallel_size={n} does not divide intermediate_size={c.intermediate_size}")
        self.num_heads = c.num_heads // n
        self.num_kv_heads = max(c.num_kv_heads // n, 1)
        # First KV head of this rank: its query heads' group (replicated) or its own block (split).
        self.kv_head_start = (self.rank * self.num_heads) // (c.num_heads // c.num_kv_heads)
        self.rows_per_rank = -(-c.vocab_size // n)
        self.vocab_start = self.rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, c.vocab_size)
        self.ffn = c.intermediate_size // n
        self.local_config = c.replace(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                      intermediate_size=self.ffn, vocab_size=self.rows_per_rank, head_dim=c.head_dim)

    @classmethod
    def join(cls, config: ModelConfig, size: int, group=None) -> "Shard":
        """This process's shard in `group` (default: the world group the launcher made)."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"tensor_parallel_size={size} needs a torch.distributed process group: launch with "
                               "torchrun (see docs/distributed.md) or call torch.distributed.init_process_group first")
        world = dist.get_world_size(group)
        if world != size:
            raise ValueError(f"tensor_parallel_size={size}, but the process group has {world} ranks")
        peers = [None] * size
        dist.all_gather_object(peers, (socket.gethostname(), os.getpid()), group=group)
        cls._joined += 1  # every rank builds its engines in the same order, so the keys agree
        key = f"anygpt/tp/{peers[0][0]}/{peers[0][1]}/{cls._joined}"
        # Made here, while every rank is known to be alive (creating it later would wait for a rank
        # that failed to load its weights as long as its timeout): rank 0 may idle between requests.
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
        plan_group = dist.new_group(ranks, timeout=timedelta(days=365), backend="gloo")
        return cls(config, dist.get_rank(group), size, group, peers, dist.distributed_c10d._get_default_store(), key,
                   plan_group, _collective_timeout_s(group))


    # -- collectives, with a failure that names the rank ---------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        with nvtx_range("anygpt/op/all_reduce"):
            self.guard(dist.all_reduce, x, group=self.group)
        return x

    def all_gather_vocab(self, local: torch.Tensor) -> torch.Tensor:
        """[B, rows_per_rank] logits of every rank -> [B, V]."""
        parts = [torch.empty_like(local) for _ in range(self.size)]
        with nvtx_range("anygpt/op/all_gather"):
            self.guard(dist.all_gather, parts, local.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[:, :self.config.vocab_size]

    def wait_for_device(self, device: torch.device, what: str) -> None:
        """Waits for the work queued on `device`, bounded by the collective timeout: collectives
        replayed inside a CUDA graph are invisible to the process group's watchdog, so a peer lost
        mid-replay would otherwise hang this rank for ever."""
        if device.type != "cuda":
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
        deadline = time.monotonic() + self.timeout_s
        while not done.query():
            if time.monotonic() > deadline:
                raise self.failure(TimeoutError(f"{what} did not finish within {self.timeout_s:.0f} s"))
            time.sleep(0)  # lets the serving thread run; a CUDA sync would spin the same way

    def guard(self, collective, *args, **kwargs):
        try:
            return collective(*args, **kwargs)
        except RankFailure:
            raise
        except Exception as err:  # gloo/NCCL raise RuntimeError or DistBackendError subclasses
            raise self.failure(err) from err

    def failure(self, err: BaseException) -> RankFailure:
        """Names the ranks gone: a peer on this host whose pid has exited (waited for briefly: a
        killed peer's sockets close a moment before its process is reaped), else the peers that
        did not report a timed-out collective of their own in the store (they hung elsewhere)."""
        host = socket.gethostname()
        local = [(r, pid) for r, (h, pid) in enumerate(self.peers) if h == host and r != self.rank]
        remote = [r for r, (h, _) in enumerate(self.peers) if h != host]
        deadline = time.monotonic() + 2.0
        while True:
            dead = [(r, pid) for r, pid in local if not _pid_alive(pid)]
            if dead or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if dead:
            names = ", ".join(f"rank {r} (pid {pid} on {host})" for r, pid in dead)
            return RankFailure(f"tensor-parallel rank {self.rank}: {names} exited; stopping. ({err})")
        hung = self._silent_peers()
        if hung:
            names = ", ".join(f"rank {r} hung (pid {self.peers[r][1]} on {self.peers[r][0]})" for r in hung)
            return RankFailure(f"tensor-parallel rank {self.rank}: {names}: it never reached the collective. ({err})")
        unchecked = f"; ranks on other hosts, not checkable from here: {remote}" if remote else ""
        return RankFailure(f"tensor-parallel rank {self.rank}: a collective failed or timed out with every rank on "
                           f"this host alive{unchecked}. ({err})")

    def _silent_peers(self, wait_s: float = 2.0) -> list[int]:
        if self.store is None:
            return []
        try:
            self.store.set(f"{self.key}/timed_out/{self.rank}", "1")
            deadline = time.monotonic() + wait_s
            while True:
                silent = [r for r in range(self.size)
                          if r != self.rank and not self.store.check([f"{self.key}/timed_out/{r}"])]
                if not silent or time.monotonic() > deadline:
                    return silent
                time.sleep(0.1)
        except Exception:  # the store lived in a rank that is gone
            return []

    # -- weights -------------------------------------------------------------------------------
    def hf_slice(self, hf_name: str) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """(rows, cols) of the HF tensor `hf_name` this rank holds (None: all)."""
        d = self.config.head_dim
        if hf_name.endswith("self_attn.q_proj.weight"):
            return (self.rank * self.num_heads * d, (self.rank + 1) * self.num_heads * d), None
        if hf_name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            return (self.kv_head_start * d, (self.kv_head_start + self.num_kv_heads) * d), None
        if hf_name.endswith("self_attn.o_proj.weight"):
            return None, (self.rank * self.num_heads * d, (self.rank + 1) * self.num_heads * d)
        if hf_name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            return (self.rank * self.ffn, (self.rank + 1) * self.ffn), None
        if hf_name.endswith("mlp.down_proj.weight"):
            return None, (self.rank * self.ffn, (self.rank + 1) * self.ffn)
        if hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (self.vocab_start, self.vocab_end), None
        return None, None

    def take(self, hf_name: str, source) -> torch.Tensor:
        """This rank's part of one tensor; `source` is a tensor or a safetensors slice (both
        index lazily). Vocabulary rows past the end are zero padding."""
        rows, cols = self.hf_slice(hf_name)
        r = slice(*rows) if rows else slice(None)
        part = source[r, slice(*cols)] if cols else (source[r] if rows else source[:])
        if hf_name in ("model.embed_tokens.weight", "lm_head.weight") and part.shape[0] < self.rows_per_rank:
            part = torch.cat([part, part.new_zeros(self.rows_per_rank - part.shape[0], part.shape[1])])
        return part


def sharded_tensors(source, shard: Shard):
    """(HF name, this rank's part) of a checkpoint directory or an iterable of (name, tensor):
    safetensors files are sliced on disk with get_slice, so no rank reads the whole model."""
    from anygpt_engine.weights import checkpoint_files

    if isinstance(source, dict):
        source = source.items()
    if not isinstance(source, (str, os.PathLike)):
        for name, tensor in source:
            yield name, shard.take(name, tensor)
        return
    for file in checkpoint_files(source):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, shard.take(name, f.get_slice(name))
        else:  # .bin: memory-mapped, so slicing reads only this rank's pages
            state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            for name, tensor in state.items():
                yield name, shard.take(name, tensor)


def _collective_timeout_s(group) -> float:
    """The timeout the launcher gave the group's collectives (torch keeps it in the backend's
    options); torch's default where a backend does not say."""
    pg = group if group is not None else dist.group.WORLD
    for device in ("cuda", "cpu"):
        try:
            return pg._get_backend(torch.device(device)).options._timeout.total_seconds()
        except (AttributeError, RuntimeError):  # no backend for this device, or no options
            continue
    return Shard.timeout_s


class TensorParallelLlama(Llama):
    """One rank's shard of the backbone: a Llama over `shard.local_config` whose attention and
    output projections (wo, w2) end in an all-reduce, and whose embedding and heads are vocabulary-parallel.

    On rank 0, `plan` (set by anygpt_engine.distributed) broadcasts every call's inputs first,
    so the other ranks run the same call; the other ranks' calls come from their follower loop.
    Inside `in_lockstep()` every rank makes the same calls itself (CUDA-graph capture at start-up)
    and nothing is published."""

    def __init__(self, config: ModelConfig, shard: Shard, device=None, dtype=None):
        super().__init__(shard.local_config, device=device, dtype=dtype)
        self.full_config = config
        self.shard = shard
        self.plan = None
        self._lockstep = False

    @contextlib.contextmanager
    def in_lockstep(self):
        self._lockstep = True
        try:
            yield
        finally:
            self._lockstep = False

    def _publish(self, method: str, *args) -> None:
        if self.shard.rank == 0 and not self._lockstep:
            if self.plan is None:
                raise RuntimeError("tensor-parallel rank 0 runs the model only while the other ranks follow: drive "
                                   "the engine through anygpt_engine.distributed.run (docs/distributed.md)")
            self.plan.publish(method, *args)

    def init_random(self, seed: int = 0, std: float = 0.02) -> None:
        """This rank's slices of the weights one rank draws with the same seed (Llama.init_random's
        order and generator, each tensor drawn whole, one at a time), so a preset generates the
        same tokens at every tensor-parallel size."""
        from anygpt_engine.weights import hf_tensors, load_into

        whole = Llama(self.full_config, device="meta")
        device, dtype = self.tok_embeddings.device, self.tok_embeddings.dtype
        generator = torch.Generator(device=device).manual_seed(seed)

        def tensors():
            for name, p in whole.named_parameters():
                if name.endswith("norm"):
                    t = torch.ones(p.shape, device=device, dtype=dtype)
                else:
                    t = torch.empty(p.shape, device=device, dtype=dtype).normal_(0.0, std, generator=generator)
                for hf_name, part in hf_tensors(name, t, self.full_config):
                    yield hf_name, self.shard.take(hf_name, part)

        load_into(self, self.config, tensors())

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.shard.vocab_start
        inside = (local >= 0) & (local < self.shard.rows_per_rank)
        x = F.embedding(torch.where(inside, local, 0), self.tok_embeddings)
        return self.shard.all_reduce(x.masked_fill_(~inside.unsqueeze(-1), 0))

    def add_projection(self, x: torch.Tensor, weight, residual: torch.Tensor) -> None:
        """Row-parallel wo / w2: each rank's partial product is all-reduced before the residual
        add (a fused add would count the residual once per rank)."""
        residual.add_(self.shard.all_reduce(ops.linear(x, weight)))

    def forward(self, tokens, positions, kv_layers, slot_mapping, block_tables,
                runs: PrefillRuns | None = None) -> torch.Tensor:
        self._publish("forward", tokens, positions, kv_layers, slot_mapping, block_tables, runs)
        return super().forward(tokens, positions, kv_layers, slot_mapping, block_tables, runs)

    def head(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel `Llama.head`: `rows` (first, count) of the whole vocabulary,
        intersected with this rank's rows on the device (graph-safe), then gathered."""
        self._publish("head", x, rows)
        start = self.shard.vocab_start
        first = (rows[0] - start).clamp(0, self.shard.rows_per_rank)
        end = (rows[0] + rows[1] - start).clamp(0, self.shard.rows_per_rank)
        local_rows = torch.stack([first, end - first])
        with nvtx_range("anygpt/op/lm_head"):
            local = lm_head(x, self.norm, self.config.rms_norm_eps, self.lm_head, rows=local_rows)
        return self.shard.all_gather_vocab(local)
