from anygpt_engine.models.llama import Llama

__all__ = ["Llama"]
