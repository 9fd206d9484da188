"""Serving runtime: paged KV cache (kv_cache), continuous batching (scheduler) and
CUDA-graph decode (graphs). The Engine in anygpt_engine.engine ties them together."""
