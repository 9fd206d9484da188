"""AsyncEngine: the engine behind an asyncio API, for servers.

    engine = AsyncEngine.from_model("anygpt-7b", max_batch_size=32)   # or AsyncEngine(Engine(...))
    async for out in engine.generate(prompt_ids, SamplingParams(...)):
        print(out.new_token_ids, out.text)                              # one step's delta
    await engine.shutdown()

One thread owns the Engine: it is the only thread that calls into it (and on CUDA it runs every
step on a stream of its own). Async callers never touch the Engine; they put commands (add,
abort, stats, call, stop) on a thread-safe queue, and the thread hands each step's outputs back to the
callers' event loops, one wake-up per loop per step. With nothing to run the thread blocks on
the queue, so an idle engine costs no CPU.

Each request is a RequestStream: an async iterator of StreamOutput, one per step that produced
something for it, carrying that step's new token ids, the text they add (when the engine has a
tokenizer) and, on the last, the finish reason. Leaving the stream early (cancelling the task
that reads it, closing the generator, or abort()) aborts the request and frees its KV blocks.

The GIL: the engine thread and the event loop share one interpreter lock. Torch ops release it,
so the event loop runs while the engine computes; but when the engine thread wants it back, a
busy event loop keeps it for up to the switch interval (5 ms by default), per hand-back. That
doubled the tiny preset's TPOT on a CPU, so AsyncEngine sets the process's switch interval to
1 ms (`gil_switch_interval`; None leaves it alone).

Admission control: `max_waiting` bounds the requests the scheduler holds waiting; a request
that would exceed it fails at once with EngineOverloaded (a server answers 503) instead of
queueing without bound. shutdown() stops admission, then drains the requests in flight or
aborts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from anygpt_engine.engine import Engine, RequestOutput
from anygpt_engine.sampling import SamplingParams
from anygpt_engine.vocab import token_ids


class EngineOverloaded(RuntimeError):
    """The waiting queue is full (max_waiting); retry later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down, or stopped after an error."""


@dataclass
class StreamOutput(RequestOutput):
    """One step of one request: RequestOutput's token delta plus the text it adds (None when the
    engine has no tokenizer; may be "" while a multi-byte character is incomplete)."""

    text: str | None = None


class IncrementalDetokenizer:
    """Text deltas of a growing id sequence. Each step decodes a short window (the ids since the
    last emitted text plus the ones before them), so the cost per step does not grow with the
    output, and the leading space a token owes to its left neighbour is kept. Text that ends in
    an incomplete UTF-8 sequence (U+FFFD) waits for the next token. `skip` ids (BOS, EOS, stop
    tokens) never become text."""

    def __init__(self, tokenizer, skip=()):
        self.tokenizer = tokenizer
        self.skip = frozenset(skip)
        self.ids: list[int] = []
        self.prefix = 0  # window start: ids before this are settled
        self.read = 0  # ids up to here have been emitted as text
        self.text = ""

    def add(self, new_ids, final: bool = False) -> str:
        self.ids += [t for t in new_ids if t not in self.skip]
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        delta = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta


class RequestStream:
    """One request's outputs (StreamOutput), as an async iterator; its prompt, the tokens and
    text so far, and its timings (perf_counter seconds)."""

    def __init__(self, owner: "AsyncEngine", request_id, prompt_ids: list[int], params: SamplingParams, loop,
                 skip_text_ids=()):
        self.request_id = request_id
        self.prompt_token_ids = prompt_ids
        self.params = params
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self._owner = owner
        self._loop = loop
        self._outputs: asyncio.Queue = asyncio.Queue()
        self._accepted = loop.create_future()
        tokenizer = owner.tokenizer
        skip = {t for t in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None))
                if t is not None} | set(skip_text_ids)
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip) if tokenizer is not None else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str | None:
        return self._detokenizer.text if self._detokenizer is not None else None

    def __aiter__(self):
        return self

    async def __anext__(self) -> StreamOutput:
        if self.finished and self._outputs.empty():
            raise StopAsyncIteration
        item = await self._outputs.get()
        if isinstance(item, BaseException):
            self.finish_reason = self.finish_reason or "abort"
            raise item
        return item

    def abort(self) -> None:
        """Stops the request (a no-op once it has finished): the engine frees its blocks at its
        next command check, and the stream ends with finish_reason "abort"."""
        if self.finished:
            return
        self.finish_reason = "abort"
        self._outputs.put_nowait(StreamOutput(self.request_id, [], True, "abort",
                                              text="" if self._detokenizer else None))
        self._owner._commands.put(("abort", self.request_id))

    # -- called on the stream's event loop by the engine thread's hand-off -------------------------
    def _deliver(self, out: RequestOutput, now: float) -> None:
        if self.finished:
            return
        if out.new_token_ids:
            if self.first_token_time is None:
                self.first_token_time = now
            self.last_token_time = now
            self.token_ids += out.new_token_ids
        text = None
        if self._detokenizer is not None:
            text = self._detokenizer.add(out.new_token_ids, final=out.finished)
        if out.finished:
            self.finish_reason = out.finish_reason
        self._outputs.put_nowait(StreamOutput(out.request_id, out.new_token_ids, out.finished, out.finish_reason,
                                              logprobs=out.logprobs, text=text))

    def _fail(self, error: BaseException) -> None:
        if not self.finished:
            self.finish_reason = "abort"
            self._outputs.put_nowait(error)


class AsyncEngine:
    """An Engine driven by its own thread; see the module docstring."""

    def __init__(self, engine: Engine | None = None, *, max_waiting: int | None = None,
                 gil_switch_interval: float | None = 0.001, _build=None):
        if gil_switch_interval is not None and not (isinstance(gil_switch_interval, (int, float))
                                                    and 0 < gil_switch_interval <= 1):
            raise ValueError(f"gil_switch_interval={gil_switch_interval!r}, expected None or seconds in (0, 1]")
        if max_waiting is not None and (isinstance(max_waiting, bool) or not isinstance(max_waiting, int)
                                        or max_waiting < 0):
            raise ValueError(f"max_waiting={max_waiting!r}, expected None (unbounded) or an int >= 0")
        if engine is None and _build is None:
            raise TypeError("AsyncEngine needs an Engine (or use AsyncEngine.from_model)")
        if engine is not None and not isinstance(engine, Engine):
            raise TypeError(f"engine must be an Engine, got {type(engine).__name__}")
        if engine is not None and engine.has_unfinished():
            raise ValueError("engine has requests in flight; AsyncEngine must be the only one driving it")
        self.max_waiting = max_waiting
        self.engine = engine
        if gil_switch_interval is not None:
            sys.setswitchinterval(gil_switch_interval)  # process-wide; see the module docstring
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[object, RequestStream] = {}  # live requests; touched by the engine thread only
        self._lock = threading.Lock()  # admission vs. the thread's exit: no add is queued after it
        self._closed = False
        self._exited = False
        self._error: BaseException | None = None
        self.num_rejected = 0  # requests refused as overloaded
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._main, args=(_build, ready, failure), name="anygpt-engine",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]

    @classmethod
    def from_model(cls, model="tiny", *, max_waiting: int | None = None, gil_switch_interval: float | None = 0.001,
                   **engine_kwargs) -> "AsyncEngine":
        """Builds the Engine (Engine(model, **engine_kwargs)) on the engine thread itself. Raises
        what Engine(...) raises."""
        return cls(max_waiting=max_waiting, gil_switch_interval=gil_switch_interval,
                   _build=lambda: Engine(model, **engine_kwargs))

    # -- properties the caller may read (fixed after start) ---------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def config(self):
        return self.engine.config

    @property
    def vocab(self):
        return self.engine.vocab

    @property
    def is_running(self) -> bool:
        """False once shut down or stopped by an error (a health check)."""
        return not self._exited and not self._closed

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the engine thread, if one did."""
        return self._error

    # -- requests ----------------------------------------------------------------------------------
    async def add_request(self, prompt, params: SamplingParams | None = None, request_id=None, *,
                          skip_text_ids=()) -> RequestStream:
        """Queues a request and returns its stream once the engine has accepted it. Raises
        ValueError/TypeError for bad input (as Engine.add_request), EngineOverloaded when
        max_waiting requests are already waiting, EngineClosed after shutdown. `prompt`: token ids
        (list, tensor, DLPack) or text when the engine has a tokenizer. `skip_text_ids`: token ids
        kept out of the stream's text (e.g. a chat template's end token)."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TypeError("prompt is a string but this engine has no tokenizer; pass token ids, or build it "
                                "with a tokenizer")
            prompt = self.tokenizer.encode(prompt)
        prompt = token_ids("prompt", prompt, self.config.vocab_size)
        if request_id is None:
            request_id = f"req-{uuid.uuid4().hex}"
        stream = RequestStream(self, request_id, prompt, params, asyncio.get_running_loop(), skip_text_ids)
        with self._lock:
            self._raise_if_closed()
            self._commands.put(("add", stream))
        try:
            await stream._accepted
        except asyncio.CancelledError:
            self.abort(request_id)  # queued after the add, so it reaches the request if the add succeeded
            raise
        return stream

    async def generate(self, prompt, params: SamplingParams | None = None, request_id=None, **kwargs):
        """Yields the request's StreamOutputs as the engine produces them; leaving early (cancel,
        aclose, break) aborts the request."""
        stream = await self.add_request(prompt, params, request_id, **kwargs)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id) -> None:
        """Aborts a request by id; a no-op for one that has finished or never existed."""
        self._commands.put(("abort", request_id))

    async def stats(self) -> dict:
        """The engine's EngineStats as a dict, plus `rejected` (requests refused as overloaded),
        read on the engine thread between steps."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            self._raise_if_closed(allow_draining=True)
            self._commands.put(("stats", future))
        return await future

    async def call(self, fn):
        """fn(engine) on the engine thread between steps (the Engine is not thread-safe), e.g.
        `await engine.call(lambda e: e.prompt_logprobs(ids))`: its result, or what it raised."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            self._raise_if_closed()
            self._commands.put(("call", future, fn))
        return await future

    def _raise_if_closed(self, allow_draining: bool = False) -> None:
        if self._error is not None:
            raise EngineClosed(f"the engine stopped after an error: {self._error!r}")
        if self._exited or (self._closed and not allow_draining):
            raise EngineClosed("the engine is shut down")

    # -- shutdown ----------------------------------------------------------------------------------
    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops admission; with drain=True lets the requests in flight finish, otherwise aborts
        them (their streams end with finish_reason "abort"); then stops the thread. With a
        timeout, requests still running when it expires are aborted."""
        with self._lock:
            self._closed = True
        self._commands.put(("stop", drain))
        if timeout is not None:
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                self._commands.put(("stop", False))
        await asyncio.to_thread(self._thread.join)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the engine thread has exited (shut down, or stopped by an error: see
        `error`) or `timeout` seconds pass; True if it has exited."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self, drain: bool = False) -> None:
        """Synchronous shutdown, for code outside an event loop."""
        with self._lock:
            self._closed = True
        self._commands.put(("stop", drain))
        self._thread.join()

    # -- the engine thread -------------------------------------------------------------------------
    def _main(self, build, ready: threading.Event, failure: list) -> None:
        try:
            if build is not None:
                self.engine = build()
            device = self.engine.device
            stream = None
            if device.type == "cuda":
                if device.index is not None:
                    torch.cuda.set_device(device)  # the current device is per thread
                torch.cuda.synchronize(device)  # work queued by whoever built the engine comes first
                stream = torch.cuda.Stream(device)
        except BaseException as err:  # noqa: BLE001 - re-raised by the constructor
            failure.append(err)
            ready.set()
            return
        ready.set()
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self._loop()
        except BaseException as err:  # noqa: BLE001 - an engine fault ends every stream with it
            self._error = err
        finally:
            with self._lock:
                self._exited = True
            self._fail_all(self._error or EngineClosed("the engine is shut down"))

    def _loop(self) -> None:
        engine = self.engine
        stopping = False
        while True:
            busy = engine.has_unfinished()
            if not busy and stopping:
                break
            try:
                commands = [self._commands.get(block=not busy)]
            except queue.Empty:
                commands = []
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                kind = command[0]
                if kind == "add":
                    self._add(command[1], stopping)
                elif kind == "abort":
                    engine.abort(command[1])
                elif kind == "stats":
                    self._reply(command[1], self._stats())
                elif kind == "call":
                    try:
                        result = command[2](engine)
                    except Exception as err:  # noqa: BLE001 - the caller's error, raised in its await
                        result = err
                    self._reply(command[1], result)
                elif kind == "stop":
                    stopping = True
                    if not command[1]:
                        for request_id in list(self._streams):
                            engine.abort(request_id)
            if engine.has_unfinished():
                self._hand_off(engine.step())

    def _add(self, stream: RequestStream, stopping: bool) -> None:
        try:
            if stopping:
                raise EngineClosed("the engine is shutting down")
            if self.max_waiting is not None and self.engine.stats().waiting >= self.max_waiting:
                self.num_rejected += 1
                raise EngineOverloaded(f"{self.max_waiting} requests are already waiting (max_waiting); retry later")
            self.engine.add_request(stream.prompt_token_ids, stream.params, request_id=stream.request_id)
        except Exception as err:  # noqa: BLE001 - bad input and overload go back to the caller
            self._reply(stream._accepted, err, stream._loop)
            return
        self._streams[stream.request_id] = stream
        self._reply(stream._accepted, None, stream._loop)

    def _stats(self) -> dict:
        stats = vars(self.engine.stats()).copy()
        stats["rejected"] = self.num_rejected
        return stats

    @staticmethod
    def _reply(future: asyncio.Future, value, loop=None) -> None:
        def settle():
            if future.done():
                return
            if isinstance(value, BaseException):
                future.set_exception(value)
            else:
                future.set_result(value)

        try:
            (loop or future.get_loop()).call_soon_threadsafe(settle)
        except RuntimeError:  # the caller's loop has closed
            pass

    def _hand_off(self, outputs: list[RequestOutput]) -> None:
        """Sends a step's outputs to their streams: one call into each event loop."""
        by_loop: dict = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_loop.setdefault(stream._loop, []).append((stream, out))
        now = time.perf_counter()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items, now)
            except RuntimeError:  # that loop has closed: its callers are gone
                pass

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            try:
                stream._loop.call_soon_threadsafe(stream._fail, error)
            except RuntimeError:
                pass
        # Adds still queued never reach the engine.
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                self._reply(command[1]._accepted, EngineClosed("the engine is shut down"), command[1]._loop)
            elif command[0] in ("stats", "call"):
                self._reply(command[1], EngineClosed("the engine is shut down"))


def _deliver_all(items, now: float) -> None:
    for stream, out in items:
        stream._deliver(out, now)


