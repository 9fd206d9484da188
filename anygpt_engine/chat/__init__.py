"""Chat on top of the engine: AnyGPT's prompt templates, reply parsing, multi-turn sessions that
reuse the KV cache, and the terminal chat behind `anygpt-engine chat`. The engine never imports
this package."""

from anygpt_engine.chat.session import CHAT_TEXT_PARAMS, Chat, chat_params
from anygpt_engine.chat.template import (TASKS, ChatTemplate, Reply, ReplySpan, base_prompt, modality_string,
                                         parse_reply, task_message)

__all__ = ["CHAT_TEXT_PARAMS", "TASKS", "Chat", "ChatTemplate", "Reply", "ReplySpan", "base_prompt", "chat_params",
           "modality_string", "parse_reply", "task_message"]
