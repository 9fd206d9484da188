from anygpt_engine.models.llama import KVCache, Llama

__all__ = ["KVCache", "Llama"]
