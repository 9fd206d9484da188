"""Serving above the engine (the engine never imports this package): AsyncEngine, an asyncio
front for one Engine driven by its own thread; the OpenAI-compatible HTTP server behind
`anygpt-engine serve`; and `anygpt-engine bench serve`, a client benchmark for any
OpenAI-compatible server."""

from anygpt_engine.serving.async_engine import (AsyncEngine, EngineClosed, EngineOverloaded, IncrementalDetokenizer,
                                                RequestStream, StreamOutput)

__all__ = ["AsyncEngine", "EngineClosed", "EngineOverloaded", "IncrementalDetokenizer", "RequestStream",
           "StreamOutput"]
