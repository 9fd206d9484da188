"""Multi-turn chat over an Engine, reusing the KV cache of the history.

    chat = Chat(Engine("/ckpt/AnyGPT-chat"))
    reply = chat.send("Hello!", on_text=lambda s: print(s, end="", flush=True))
    reply = chat.send("Say it aloud.", force_modality="speech")   # reply.spans[0].codes(): level-1 codes
    other = chat.fork()                                             # same history, shares its cached blocks

AnyGPT's own chat re-renders and re-tokenises the whole conversation every turn. Here the
history is kept as token ids: each turn's prompt is the previous prompt, the reply exactly as
generated, and the tokens of the new turn's text, so the engine's prefix cache holds all but the
last partial block and a turn's prefill computes only its new tokens (Reply.cached_tokens says
how many came from the cache). The new text is tokenised after the added token that ends the
history (<eos>), which is how the full rendered string would tokenise there: text is split at
added tokens before sentencepiece sees it.
"""

from __future__ import annotations

import dataclasses

from anygpt_engine.chat.template import ChatTemplate, Reply, parse_reply
from anygpt_engine.sampling import SamplingParams

# Text replies sample AnyGPT's chat generate_config (temperature 1, top_p 1, transformers' default
# top_k 50, max 500, min 10) with one sequence, so they stream as they are generated. AnyGPT itself
# runs that config as 5-beam beam-sample, which delivers a reply only when the search ends: pass
# params=SamplingParams.anygpt("text") for exactly that.
CHAT_TEXT_PARAMS = dataclasses.replace(SamplingParams.anygpt("text"), num_beams=1)


def chat_params(to_modality: str = "text") -> SamplingParams:
    """The sampling AnyGPT's chat uses for a requested output modality."""
    if to_modality in ("", "text"):
        return CHAT_TEXT_PARAMS
    return SamplingParams.anygpt(to_modality)


class Chat:
    """A conversation with an engine that has a tokenizer. Not thread-safe; `send` drives the
    engine itself (as Engine.generate does), so the engine must have no other requests in flight."""

    def __init__(self, engine, template: ChatTemplate | str = "MMGPT", *, system: str | None = None,
                 params: SamplingParams | None = None):
        if engine.tokenizer is None:
            raise ValueError("Chat needs an engine with a tokenizer (a checkpoint directory with tokenizer files, or "
                             "Engine(..., tokenizer=DIR))")
        if isinstance(template, str):
            template = ChatTemplate.anygpt(template)
        if not isinstance(template, ChatTemplate):
            raise TypeError(f"template must be a ChatTemplate or a template name, got {type(template).__name__}")
        if params is not None and not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.template = template
        self.system = template.system if system is None else system
        self.params = params if params is not None else CHAT_TEXT_PARAMS
        self._turns: list[dict] = []
        self._ids: list[int] = []
        end = self.tokenizer.token_to_id(template.assistant_end)
        self._end_id = end  # None when the template's end marker is not one token of this tokenizer
        self._stop_ids = tuple(dict.fromkeys(t for t in (end, self.tokenizer.eos_token_id) if t is not None))

    @classmethod
    def from_messages(cls, engine, messages: list[dict], template: ChatTemplate | str = "MMGPT", *,
                      params: SamplingParams | None = None) -> "Chat":
        """Continues an existing conversation (OpenAI-style messages ending with an assistant
        message); its history is the tokenised rendering, prefilled on the next turn."""
        chat = cls(engine, template, params=params)
        system, turns = chat.template.split(messages)
        if not turns or turns[-1]["role"] != "assistant":
            raise ValueError("messages must end with an assistant message (the next turn is the user's)")
        chat.system, chat._turns = system, turns
        chat._ids = chat.tokenizer.encode(chat.template.render(messages))
        return chat

    # -- state ---------------------------------------------------------------------------------
    @property
    def messages(self) -> list[dict]:
        """The conversation, OpenAI style: the system message, then user and assistant turns."""
        return [{"role": "system", "content": self.system}, *(dict(m) for m in self._turns)]

    @property
    def token_ids(self) -> list[int]:
        """The history as the engine has seen it: every prompt and reply so far."""
        return list(self._ids)

    def clear(self) -> None:
        self._turns, self._ids = [], []

    def fork(self) -> "Chat":
        """An independent chat with the same history; both keep hitting the same cached prefix."""
        other = Chat(self.engine, self.template, system=self.system, params=self.params)
        other._turns = [dict(m) for m in self._turns]
        other._ids = list(self._ids)
        return other

    # -- prompts -------------------------------------------------------------------------------
    def prompt_ids(self, content: str, force_modality: str | None = None) -> list[int]:
        """The ids the next turn would prefill for a user message."""
        if not isinstance(content, str):
            raise TypeError(f"content must be a str, got {type(content).__name__}")
        if not content.strip():
            raise ValueError("content is empty, expected a user message")
        user = {"role": "user", "content": content}
        if not self._ids:
            return self.tokenizer.encode(self.template.render([*self.messages, user], force_modality))
        before = self.template.render(self.messages)
        after = self.template.render([*self.messages, user], force_modality)
        if not after.startswith(before):
            raise RuntimeError("the rendered conversation does not extend the previous one")  # render's contract
        return self._ids + self._encode_continuation(after[len(before):])

    def _encode_continuation(self, text: str) -> list[int]:
        """Tokens `text` gets right after the history's last token, when that is an added token
        (the reply's <eos>); otherwise a plain encoding."""
        last = self._ids[-1] if self._ids else None
        anchor = self.tokenizer.id_to_token(last) if last is not None else None
        if anchor is None or self.tokenizer.added_tokens.get(anchor) != last:
            return self.tokenizer.encode(text, add_bos=False)
        ids = self.tokenizer.encode(anchor + text, add_bos=False)
        # A non-legacy sentencepiece tokenizer puts "▁" before a leading added token.
        cut = ids.index(last) if last in ids[:2] else None
        if cut is None:
            raise RuntimeError(f"the tokenizer did not keep the added token {anchor!r} whole")
        return ids[cut + 1:]

    # -- a turn --------------------------------------------------------------------------------
    def send(self, content: str, params: SamplingParams | None = None, *, force_modality: str | None = None,
             on_text=None) -> Reply:
        """Sends a user message (it may carry modality tokens, see modality_string) and returns
        the parsed reply. `params` defaults to the chat's; its stop tokens, when unset, are the
        template's end token and the tokenizer's eos. `on_text(str)` receives the reply's text
        (outside modality spans) as it is generated."""
        engine = self.engine
        if engine.has_unfinished():
            raise RuntimeError("Chat.send drives the engine itself; finish or abort the engine's other requests first")
        params = self.params if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.stop_token_ids is None:
            params = dataclasses.replace(params, stop_token_ids=self._stop_ids)
        prompt = self.prompt_ids(content, force_modality)
        hits_before = engine.stats().prefix_hits
        request = engine.add_request(prompt, params)
        reply_ids, finish, shown = [], None, ""
        forced = [engine.vocab.start_token(force_modality)] if force_modality else []
        try:
            while finish is None:
                for out in engine.step():
                    if out.request_id != request:
                        continue
                    reply_ids.extend(out.new_token_ids)
                    if out.finished:
                        finish = out.finish_reason
                    if on_text is not None:
                        shown = self._stream(forced + reply_ids, shown, on_text)
        except BaseException:
            if finish is None:
                engine.abort(request)
                while engine.has_unfinished():
                    engine.step()
            raise
        # Modality tokens stay in the text even where a tokenizer marks them special; only </s> goes.
        eos = self.tokenizer.eos_token_id
        reply = parse_reply(self.tokenizer.decode([t for t in forced + reply_ids if t != eos]), self.template)
        reply.token_ids, reply.finish_reason = reply_ids, finish
        reply.prompt_tokens, reply.cached_tokens = len(prompt), engine.stats().prefix_hits - hits_before
        self._remember(content, prompt, reply_ids, reply)
        return reply

    def _remember(self, content: str, prompt: list[int], reply_ids: list[int], reply: Reply) -> None:
        history = prompt + reply_ids
        if history[-1] == self.tokenizer.eos_token_id and history[-1] != self._end_id:
            history.pop()  # </s> never goes mid-conversation; the template's end token closes the reply
        if self._end_id is None:
            history += self.tokenizer.encode(self.template.assistant_end, add_bos=False)
        elif history[-1] != self._end_id:
            history.append(self._end_id)
        self._ids = history
        self._turns += [{"role": "user", "content": content}, {"role": "assistant", "content": reply.raw}]

    def _stream(self, reply_ids: list[int], shown: str, on_text) -> str:
        text = self.tokenizer.decode(self._text_ids(reply_ids), skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(shown) or len(text) == len(shown):
            return shown  # a partial UTF-8 sequence, or the decode changed earlier text: wait
        on_text(text[len(shown):])
        return text

    def _text_ids(self, ids: list[int]) -> list[int]:
        """The reply's ids outside modality spans, without its end tokens."""
        vocab = self.engine.vocab
        starts = {vocab.start_token(m): vocab.end_token(m) for m in vocab.modalities}
        out, closing = [], None
        for token in ids:
            if closing is not None:
                closing = None if token == closing else closing
            elif token in starts:
                closing = starts[token]
            elif token not in self._stop_ids:
                out.append(token)
        return out

