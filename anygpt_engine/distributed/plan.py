"""One scheduler: rank 0 runs the engine (add_request/step); before each model call it
broadcasts the call's inputs (the step plan) and the other ranks replay the same call on their
shards, so every collective inside it meets its peers. The plan travels on its own gloo group
with no practical timeout (rank 0 may idle between requests; Shard.join makes it); the model's collectives keep the
launcher's timeout, so a rank that dies or hangs mid-step ends the others with a RankFailure
naming it.

With CUDA graphs, a decode step is one REPLAY: rank 0 sends the step's host inputs and every
rank replays its own captured graph (the all-reduces inside it meet their peers on the device).

Wire format: a fixed header of int64 (op and sizes), then one int64 payload and, for hidden
states, their raw bytes."""

from __future__ import annotations

import contextlib
import signal
import threading

import torch
import torch.distributed as dist

from anygpt_engine.models.llama import PrefillRuns
from anygpt_engine.models.tensor_parallel import RankFailure, TensorParallelLlama
from anygpt_engine.runtime.graphs import DecodeInputs
from anygpt_engine.runtime.kv_cache import PagedKVCache

_HEADER = 16
_REPLAY_INPUTS = ("tokens", "positions", "slot_mapping", "block_tables", "slots", "head_rows")
STOP, FORWARD, HEAD, COPY_BLOCKS, REPLAY = range(5)


class _Channel:
    def __init__(self, engine):
        if not isinstance(getattr(engine, "model", None), TensorParallelLlama):
            raise ValueError("engine must be built with tensor_parallel_size > 1 (this one runs on a single rank)")
        self.engine = engine
        self.shard = engine.model.shard
        self.group = self.shard.plan_group
        self.source = dist.get_global_rank(self.group, 0)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        self.shard.guard(dist.broadcast, tensor, self.source, group=self.group)
        return tensor


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x.detach().contiguous().cpu().view(-1).view(torch.uint8)


class Leader(_Channel):
    """Rank 0's side: attached to its engine's model (and KV-cache copies), publishes each call."""

    def __init__(self, engine):
        super().__init__(engine)
        if self.shard.rank != 0:
            raise ValueError(f"Leader runs on rank 0, this is rank {self.shard.rank}")
        self.copy_blocks = engine.kv_cache.copy_blocks
        engine.model.plan = self
        engine.kv_cache.copy_blocks = self._copy_blocks
        self.replay = engine.graphs.run if engine.graphs is not None else None
        if self.replay is not None:
            engine.graphs.run = self._replay

    def _send(self, header: list[int], ints: list[torch.Tensor], raw: torch.Tensor | None = None) -> None:
        self.broadcast(torch.tensor(header + [0] * (_HEADER - len(header)), dtype=torch.int64))
        if ints:
            self.broadcast(torch.cat([t.reshape(-1).to("cpu", torch.int64) for t in ints]))
        if raw is not None:
            self.broadcast(raw)

    def _copy_blocks(self, pairs) -> None:
        if pairs:
            self._send([COPY_BLOCKS, len(pairs)], [torch.tensor(pairs)])
        self.copy_blocks(pairs)

    def _replay(self, host: DecodeInputs):
        """A captured decode step: its inputs go out, then every rank replays its own graph."""
        self._send([REPLAY, *host.block_tables.shape], [getattr(host, name) for name in _REPLAY_INPUTS])
        outputs = self.replay(host)
        self.shard.wait_for_device(self.engine.device, "a decode graph replay")
        return outputs

    def publish(self, method: str, *args) -> None:
        if method == "forward":
            tokens, positions, kv_layers, slot_mapping, block_tables, runs = args
            b, s = tokens.shape
            main = kv_layers is self.engine.kv_cache.layers
            header = [FORWARD, b, s, 0 if main else kv_layers[0].shape[1], *block_tables.shape]
            ints = [tokens, positions, slot_mapping, block_tables]
            if runs is not None:
                header += [runs.cu_seqlens_q.numel() - 1, runs.block_tables.shape[1], runs.max_q_len, int(runs.fresh)]
                ints += [runs.cu_seqlens_q, runs.kv_lens, runs.block_tables]
            self._send(header, ints)
        elif method == "head":
            x, rows = args
            self._send([HEAD, *x.shape], [rows], _bytes(x))
        else:
            raise ValueError(f"method={method!r}, expected 'forward' or 'head'")

    def stop(self) -> None:
        """Releases the followers (they return from follow()) and detaches from the engine."""
        try:
            self._send([STOP], [])
        finally:
            self.detach()

    def detach(self) -> None:
        self.engine.model.plan = None
        self.engine.kv_cache.copy_blocks = self.copy_blocks
        if self.replay is not None:
            self.engine.graphs.run = self.replay


class _Follower(_Channel):
    def recv(self, n: int, dtype=torch.int64) -> torch.Tensor:
        return self.broadcast(torch.empty(n, dtype=dtype))

    def loop(self) -> None:
        engine, model = self.engine, self.engine.model
        device, dtype, hidden = engine.device, engine.dtype, model.config.hidden_size
        while True:
            header = self.recv(_HEADER).tolist()
            op = header[0]
            if op == STOP:
                return
            if op == COPY_BLOCKS:
                pairs = self.recv(2 * header[1]).view(-1, 2).tolist()
                engine.kv_cache.copy_blocks([tuple(p) for p in pairs])
            elif op == FORWARD:
                self._forward(header, device)
            elif op == REPLAY:
                self._replay(header)
            elif op == HEAD:
                n = header[1]
                rows = self.recv(2).to(device)
                raw = self.recv(n * hidden * dtype.itemsize, torch.uint8)
                model.head(raw.view(dtype).view(n, hidden).to(device), rows)
            else:
                raise RuntimeError(f"tensor-parallel rank {self.shard.rank}: unknown step-plan op {op} from rank 0")

    def _replay(self, header: list[int]) -> None:
        n, w = header[1:3]
        sizes = [n, n, n, n * w, n, 2]
        parts = self.recv(sum(sizes)).split(sizes)
        host = DecodeInputs(**{name: part for name, part in zip(_REPLAY_INPUTS, parts)})
        host.block_tables = host.block_tables.view(n, w)
        self.engine.graphs.run(host)
        self.shard.wait_for_device(self.engine.device, "a decode graph replay")

    def _forward(self, header: list[int], device) -> None:
        engine = self.engine
        _, b, s, cache_blocks, bt_rows, bt_cols = header[:6]
        n_runs, run_width, max_q_len, fresh = header[6:10]
        sizes = [b * s, b * s, b * s, bt_rows * bt_cols]
        if n_runs:
            sizes += [n_runs + 1, n_runs, n_runs * run_width]
        parts = list(self.recv(sum(sizes)).to(device).split(sizes))
        tokens, positions, slot_mapping = (p.view(b, s) for p in parts[:3])
        block_tables = parts[3].view(bt_rows, bt_cols)
        runs = None
        if n_runs:
            runs = PrefillRuns(parts[4], parts[5], parts[6].view(n_runs, run_width), max_q_len, bool(fresh))
        if cache_blocks:  # a private cache (Engine.logits): the same shape on every rank
            layers = PagedKVCache(engine.model.config, cache_blocks, engine.block_size, device, engine.dtype).layers
        else:
            layers = engine.kv_cache.layers
        engine.model(tokens, positions, layers, slot_mapping, block_tables, runs=runs)


def follow(engine) -> None:
    """Ranks other than 0: replay rank 0's model calls until it stops (or a rank fails)."""
    follower = _Follower(engine)
    if follower.shard.rank == 0:
        raise ValueError("rank 0 leads (run() or Leader); follow() is for the other ranks")
    with torch.inference_mode():
        follower.loop()


@contextlib.contextmanager
def _signals_ignored():
    """A follower outlives SIGINT/SIGTERM (Ctrl-C reaches every rank of the terminal's process
    group; torchrun forwards SIGTERM to all ranks): rank 0 drains its requests, which needs the
    followers, then its STOP releases them. A follower whose leader is gone ends with a
    RankFailure instead; torchrun's SIGKILL still ends it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(engine, main):
    """Every rank calls this with its tensor-parallel engine: rank 0 returns main(engine), run
    while the others follow; the others return None once rank 0's main has returned or raised."""
    shard = engine.model.shard
    # Every rank built its engine: a rank that failed to (bad weights, out of memory) is named here.
    shard.guard(dist.barrier, group=shard.group)
    if shard.rank != 0:
        with _signals_ignored():
            follow(engine)
        return None
    leader = Leader(engine)
    try:
        result = main(engine)
    except RankFailure:  # the followers are gone or stuck: no stop to send them
        leader.detach()
        raise
    except BaseException:
        try:
            leader.stop()
        except Exception:  # the first error is the one to see
            pass
        raise
    leader.stop()
    return result
