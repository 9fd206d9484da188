"""One request's tokens as the engine produces them, for consumers that start work before the
reply is complete (SpeechPipeline.stream)."""

from __future__ import annotations

from typing import Iterator

from anygpt_engine.engine import Engine
from anygpt_engine.sampling import SamplingParams


def stream_tokens(engine: Engine, prompt_ids, params: SamplingParams | None = None) -> Iterator[int]:
    """Yields the request's token ids step by step, driving engine.step() itself (so, like
    Engine.generate, it needs an engine with no other requests in flight). Closing the iterator
    early (a consumer that stops at <eosp>) aborts the request and frees its KV blocks."""
    if engine.has_unfinished():
        raise RuntimeError("stream_tokens() drives the engine itself; finish or abort the requests added with "
                           "add_request() first")
    request_id = engine.add_request(prompt_ids, params)
    finished = False
    try:
        while not finished:
            for out in engine.step():
                finished = finished or out.finished
                yield from out.new_token_ids
    finally:
        if not finished:
            engine.abort(request_id)
            while engine.has_unfinished():
                engine.step()
