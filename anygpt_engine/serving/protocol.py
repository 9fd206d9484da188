"""OpenAI's request fields -> the engine's inputs, checked; errors in OpenAI's shape.

Every bad field raises APIError(400) naming the field (`param`), the value and what was expected,
before anything reaches the engine. Extensions beyond OpenAI's fields (vLLM's spellings):
top_k, repetition_penalty, min_tokens, ignore_eos, stop_token_ids, return_token_ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from anygpt_engine.sampling import MAX_LOGPROBS, SamplingParams

MAX_CHOICES = 16  # `n`: more is more requests' worth of batch slots and KV cache for one client


class APIError(Exception):
    """An error response: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Options:
    """What a completion request asks of the server beyond sampling."""

    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    stop: list[str] = field(default_factory=list)


class Fields:
    """Typed reads of a JSON object's fields, each raising a 400 that names the field."""

    def __init__(self, body: dict):
        self.body = body

    def get(self, name: str, default=None):
        value = self.body.get(name, default)
        return default if value is None else value

    def integer(self, name: str, default: int | None, low: int | None = None, high: int | None = None) -> int | None:
        value = self.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(name, f"{name}={value!r} is not an integer")
        if low is not None and value < low:
            raise bad(name, f"{name}={value} is below its minimum {low}")
        if high is not None and value > high:
            raise bad(name, f"{name}={value} is above its maximum {high}")
        return value

    def number(self, name: str, default: float | None, low: float | None = None, high: float | None = None, *,
               low_open: bool = False) -> float | None:
        value = self.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(name, f"{name}={value!r} is not a finite number")
        if low is not None and (value < low or (low_open and value == low)):
            raise bad(name, f"{name}={value} must be {'>' if low_open else '>='} {low}")
        if high is not None and value > high:
            raise bad(name, f"{name}={value} must be <= {high}")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise bad(name, f"{name}={value!r} is not a boolean")
        return value

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.get(name, default)
        if value is not None and not isinstance(value, str):
            raise bad(name, f"{name}={value!r} is not a string")
        return value


def check_unsupported(fields: Fields) -> None:
    """OpenAI fields the engine does not implement: rejected unless they ask for the default."""
    for name in ("presence_penalty", "frequency_penalty"):
        if fields.number(name, 0.0) != 0.0:
            raise bad(name, f"{name} is not supported (use repetition_penalty)")
    if fields.get("logit_bias"):
        raise bad("logit_bias", "logit_bias is not supported")
    for name in ("tools", "functions", "suffix"):
        if fields.get(name):
            raise bad(name, f"{name} is not supported")
    if fields.get("response_format") not in (None, {"type": "text"}):
        raise bad("response_format", "response_format other than {'type': 'text'} is not supported")


def token_list(name: str, value, vocab_size: int) -> list[int]:
    """A list of token ids, each in the vocabulary."""
    if not isinstance(value, list) or not value:
        raise bad(name, f"{name} must be a non-empty list of token ids")
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int):
            raise bad(name, f"{name}[{i}]={t!r} is not an integer token id")
        if not 0 <= t < vocab_size:
            raise bad(name, f"{name}[{i}]={t} is outside the vocabulary, expected 0 <= id < {vocab_size}",
                      "invalid_token_id")
    return list(value)


def completion_prompt(body: dict, tokenizer, vocab_size: int) -> list[int]:
    """/v1/completions' prompt: text, token ids, or a one-element list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad("prompt", f"prompt holds {len(prompt)} prompts; one prompt per request is supported")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "prompt is empty")
        if tokenizer is None:
            raise bad("prompt", "this model has no tokenizer: send the prompt as a list of token ids",
                      "tokenizer_required")
        return tokenizer.encode(prompt)
    if isinstance(prompt, list):
        return token_list("prompt", prompt, vocab_size)
    raise bad("prompt", f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")


def sampling(fields: Fields, prompt_len: int, max_model_len: int, vocab_size: int, *, defaults: SamplingParams,
             max_tokens_default: int | None, has_tokenizer: bool,
             stop_ids: tuple[int, ...] | None = None,
             logprobs: int | None = None) -> tuple[SamplingParams, list[str]]:
    """SamplingParams and stop strings from a request's fields. max_tokens defaults to
    `max_tokens_default`, or to what the context leaves when that is None; prompt + max_tokens
    must fit in the context (max_model_len). `logprobs`: from completion_logprobs or
    chat_logprobs."""
    if prompt_len >= max_model_len:
        raise bad("prompt", f"the prompt has {prompt_len} tokens; this model's context is {max_model_len} tokens, "
                            "so a prompt may have at most max_model_len - 1", "context_length_exceeded")
    room = max_model_len - prompt_len
    name = "max_completion_tokens" if fields.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = fields.integer(name, None, low=1)
    if max_tokens is None:
        max_tokens = room if max_tokens_default is None else min(max_tokens_default, room)
    elif max_tokens > room:
        raise bad(name, f"{name}={max_tokens} is too large: this model's context is {max_model_len} tokens and the "
                        f"prompt has {prompt_len}, so at most {room} can be generated", "context_length_exceeded")
    temperature = fields.number("temperature", defaults.temperature, low=0.0)
    top_p = fields.number("top_p", defaults.top_p, low=0.0, high=1.0, low_open=True)
    top_k = fields.integer("top_k", defaults.top_k, low=-1)
    repetition_penalty = fields.number("repetition_penalty", defaults.repetition_penalty, low=0.0, low_open=True)
    min_tokens = fields.integer("min_tokens", min(defaults.min_new_tokens, max_tokens), low=0)
    if min_tokens > max_tokens:
        raise bad("min_tokens", f"min_tokens={min_tokens} is above max_tokens={max_tokens}")
    seed = fields.integer("seed", None)
    if seed is not None and not -2 ** 63 <= seed < 2 ** 63:
        raise bad("seed", f"seed={seed} does not fit in 64 bits")
    stops = fields.get("stop", [])
    stops = [stops] if isinstance(stops, str) else stops
    if not isinstance(stops, list) or any(not isinstance(s, str) or not s for s in stops):
        raise bad("stop", "stop must be a non-empty string or a list of them")
    if stops and not has_tokenizer:
        raise bad("stop", "stop strings need a tokenizer, which this model lacks; use stop_token_ids",
                  "tokenizer_required")
    stop_token_ids = fields.get("stop_token_ids")
    if stop_token_ids is not None:
        stop_ids = tuple(token_list("stop_token_ids", stop_token_ids, vocab_size)) if stop_token_ids else ()
    if fields.boolean("ignore_eos", False):
        stop_ids = tuple(stop_token_ids or ())
    params = SamplingParams(temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
                            repetition_penalty=repetition_penalty, min_new_tokens=min_tokens,
                            max_new_tokens=max_tokens, stop_token_ids=stop_ids, seed=seed, logprobs=logprobs)
    return params, stops


def choices(fields: Fields) -> int:
    """`n`: how many choices (each its own request of the same prompt), 1..MAX_CHOICES."""
    return fields.integer("n", 1, low=1, high=MAX_CHOICES)


def best_of(fields: Fields, n: int, stream: bool) -> int:
    """/v1/completions' `best_of`: candidates generated for the n returned (default n)."""
    value = fields.integer("best_of", n, low=1, high=MAX_CHOICES)
    if value < n:
        raise bad("best_of", f"best_of={value} is below n={n}: best_of candidates are generated and the best n "
                             "returned")
    if value > n and stream:
        raise bad("best_of", f"best_of={value} > n={n} cannot be streamed (the best are known only at the end)")
    return value


def completion_logprobs(fields: Fields) -> int | None:
    """/v1/completions' `logprobs`: how many alternatives per token (0..20), or None."""
    return fields.integer("logprobs", None, low=0, high=MAX_LOGPROBS)


def chat_logprobs(fields: Fields) -> int | None:
    """/v1/chat/completions' `logprobs: true` with `top_logprobs` alternatives (0..20), or None."""
    top = fields.integer("top_logprobs", None, low=0, high=MAX_LOGPROBS)
    if not fields.boolean("logprobs", False):
        if top is not None:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
        return None
    return top or 0


def completion_logprobs_body(token_ids, entries, text_offsets, token_text) -> dict:
    """The legacy completions logprobs object of tokens and their TokenLogprobs entries (None:
    an echoed prompt's first token, which has no log-probability)."""
    return {"tokens": [token_text(t) for t in token_ids],
            "token_logprobs": [e.logprob if e is not None else None for e in entries],
            "top_logprobs": [{token_text(t): lp for t, lp in e.top} if e is not None else None for e in entries],
            "text_offset": list(text_offsets)}


def chat_logprobs_body(entries, token_text) -> dict:
    """The chat completions logprobs object ({"content": [...]}) of TokenLogprobs entries."""
    def item(token_id, logprob):
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def options(fields: Fields) -> Options:
    stream = fields.boolean("stream", False)
    stream_options = fields.get("stream_options", {})
    if not isinstance(stream_options, dict):
        raise bad("stream_options", "stream_options must be an object")
    include_usage = Fields(stream_options).boolean("include_usage", False)
    if include_usage and not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    return Options(stream=stream, include_usage=include_usage,
                   return_token_ids=fields.boolean("return_token_ids", False))


class StopStrings:
    """Cuts a text stream at the first stop string. Text that could be the start of a stop string
    is held back until it is known not to be one; the stop string itself is never emitted."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, delta: str, final: bool) -> str:
        """The text to emit after `delta`; sets `stopped` when a stop string appeared."""
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            end = cut
        else:
            end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out
