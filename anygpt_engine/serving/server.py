"""`anygpt-engine serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over an AsyncEngine.

    GET  /health                   200 while the engine runs, else 503
    GET  /metrics                  Prometheus text (serving/metrics.py)
    GET  /v1/models                the served model, with max_model_len
    POST /v1/completions           prompt as text or token ids; stream (SSE) or not; return_token_ids
    POST /v1/chat/completions      AnyGPT's chat template; input_audio and image_url (data URL) parts;
                                   modalities ["text", "audio"] or ["text", "image"]
    POST /v1/audio/speech          text -> wav bytes, or pcm streamed as spoken (AnyGPT's text-to-speech instruction)
    POST /v1/audio/transcriptions  multipart wav -> text (AnyGPT's speech-to-text instruction)

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for bad fields,
401 for a wrong API key, 404 for an unknown model or path, 413 for a body over the limit, 503
when the waiting queue is full or the engine has stopped. Requests are independent: a bad or
aborted one never changes another's tokens (the engine samples each request from its own seed),
and a client that disconnects aborts its request, freeing its KV blocks.

    app = build_app(AsyncEngine.from_model("tiny"), model_name="tiny")   # embed in your own ASGI stack
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import itertools
import json
import signal
import threading
import time
import uuid
import weakref

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from anygpt_engine.chat import ChatTemplate, chat_params
from anygpt_engine.chat.template import parse_reply
from anygpt_engine.sampling import SamplingParams
from anygpt_engine.serving import protocol
from anygpt_engine.serving.async_engine import (AsyncEngine, EngineClosed, EngineOverloaded, IncrementalDetokenizer,
                                                RequestStream)
from anygpt_engine.serving.image import ImageIO, data_url_bytes
from anygpt_engine.serving.metrics import ServerMetrics
from anygpt_engine.serving.protocol import APIError, Fields, StopStrings, bad
from anygpt_engine.serving.speech import SPEECH_TO_TEXT, TEXT_TO_SPEECH, SpeechIO, read_wav_bytes

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # base64 audio and images in chat messages need room
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 (by its Content-Length at
    once, or while it is read when it is chunked)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = JSONResponse(self._error().body(), status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._error()
            return message

        return await self.app(scope, limited, send)

    def _error(self) -> APIError:
        return APIError(413, f"the request body is over this server's limit of {self.limit} bytes",
                        code="request_too_large")


class _EventStream(StreamingResponse):
    """A streamed response (SSE, or raw audio) that calls on_close when it ends however it ends,
    even when the client left before the body was first read (the body's own finally would then
    never run)."""

    def __init__(self, content, on_close, media_type: str = "text/event-stream"):
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


@dataclasses.dataclass
class _Result:
    """A finished generation as the endpoints report it."""

    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list  # TokenLogprobs per token, when the request asked for them
    text_offsets: list[int]  # where each of those tokens' text starts in `text`


class OpenAIServer:
    """The endpoints' logic over one AsyncEngine; `app` is the FastAPI application."""

    def __init__(self, engine: AsyncEngine, *, model_name: str, api_key: str | None = None,
                 speech: SpeechIO | None = None, images: ImageIO | None = None, template: str = "MMGPT",
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, shutdown_timeout: float = 5.0):
        if not isinstance(engine, AsyncEngine):
            raise TypeError(f"engine must be an AsyncEngine, got {type(engine).__name__}")
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.speech = speech
        self.images = images
        self.template = ChatTemplate.anygpt(template)
        self.max_model_len = engine.config.max_seq_len
        self.vocab_size = engine.config.vocab_size
        self.tokenizer = engine.tokenizer
        self.metrics = ServerMetrics()
        self._ended: weakref.WeakSet = weakref.WeakSet()  # requests already recorded in the metrics
        self.created = int(time.time())
        self.shutdown_timeout = shutdown_timeout
        self.app = self._build(max_body_bytes)

    # -- the application ------------------------------------------------------------------------
    def _build(self, max_body_bytes: int) -> FastAPI:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            await self.engine.shutdown(drain=True, timeout=self.shutdown_timeout)

        app = FastAPI(title="anygpt-engine", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(APIError)
        async def api_error(request, err: APIError):
            return JSONResponse(err.body(), status_code=err.status)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request, err: StarletteHTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
            return JSONResponse(APIError(err.status_code, str(err.detail), code=code).body(),
                                status_code=err.status_code)

        @app.exception_handler(Exception)
        async def internal_error(request, err: Exception):
            body = APIError(500, f"internal error: {err!r}", type="server_error").body()
            return JSONResponse(body, status_code=500)

        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.metrics_text, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/audio/speech", self.audio_speech, methods=["POST"])
        app.add_api_route("/v1/audio/transcriptions", self.audio_transcriptions, methods=["POST"])
        app.add_middleware(_BodyLimit, limit=max_body_bytes)
        return app

    # -- plumbing -------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _json(self, request: Request) -> dict:
        self._authorize(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad(None, f"We could not parse the JSON body of your request: {err}", "invalid_json") from None
        if not isinstance(body, dict):
            raise bad(None, f"the request body must be a JSON object, got {type(body).__name__}", "invalid_json")
        self._check_model(body.get("model"))
        return body

    def _check_model(self, model) -> None:
        if model is None:
            raise bad("model", "model is required")
        if model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise bad(None, f"{what} needs a text tokenizer, which this model lacks (start the server with "
                            "--tokenizer DIR or a checkpoint that ships one)", "tokenizer_required")
        return self.tokenizer

    def _need_speech(self, what: str, output: bool) -> SpeechIO:
        if self.speech is None or (output and self.speech.pipeline is None):
            flags = "--speech-tokenizer CONFIG CKPT" + (" and --soundstorm PT" if output else "")
            raise bad(None, f"{what} needs speech codecs, which this server was started without ({flags})",
                      "speech_unavailable")
        return self.speech

    def _need_images(self, param: str, output: bool) -> ImageIO:
        if self.images is None:
            flags = "--image-tokenizer PATH" + (" and --image-diffusion DIR" if output else "")
            raise bad(param, f"this server has no image tokenizer (start it with {flags})", "image_unavailable")
        if output and not self.images.can_draw:
            raise bad(param, "image output needs a Stable Diffusion 2.1 unCLIP pipeline to draw with, which this "
                             "server has not (start it with --image-diffusion DIR)", "image_unavailable")
        return self.images

    async def _start(self, prompt_ids: list[int], params: SamplingParams, skip_text_ids=()) -> RequestStream:
        try:
            return await self.engine.add_request(prompt_ids, params, skip_text_ids=skip_text_ids)
        except EngineOverloaded as err:
            raise APIError(503, f"the server is overloaded: {err}", type="server_error", code="overloaded") from None
        except EngineClosed as err:
            raise APIError(503, str(err), type="server_error", code="unavailable") from None
        except (ValueError, TypeError) as err:
            raise bad(None, str(err)) from None

    async def _start_choices(self, prompt_ids: list[int], params: SamplingParams, n: int,
                             skip_text_ids=()) -> list[RequestStream]:
        """n requests of one prompt, one per choice (they share the prompt's cached KV blocks);
        with a seed, choice i samples with seed + i."""
        streams = []
        try:
            for i in range(n):
                choice = params if params.seed is None or i == 0 else dataclasses.replace(
                    params, seed=(params.seed + i + 2 ** 63) % 2 ** 64 - 2 ** 63)  # stays a signed 64-bit seed
                streams.append(await self._start(prompt_ids, choice, skip_text_ids))
        except BaseException:
            self._end_all(streams)
            raise
        return streams

    def _end_all(self, streams: list[RequestStream]) -> None:
        for stream in streams:
            self._end(stream, None)

    def _end(self, stream: RequestStream, finish: str | None) -> None:
        """Aborts the request if it still runs (a no-op once finished) and records it, once."""
        stream.abort()
        if stream not in self._ended:
            self._ended.add(stream)
            self.metrics.observe(stream, finish)

    async def _events(self, stream: RequestStream, stops: list[str]):
        """(token id delta, text delta, finish reason or None, TokenLogprobs or None) per step; a
        stop string ends the request early with "stop". Leaving (a disconnect) aborts the request."""
        cut = StopStrings(stops) if stops else None
        finish = None
        try:
            async for out in stream:
                text = out.text or ""
                finish = out.finish_reason if out.finished else None
                if cut is not None:
                    text = cut.feed(text, final=out.finished)
                    if cut.stopped:
                        finish = "stop"
                yield out.new_token_ids, text, finish, out.logprobs
                if finish is not None:
                    return
        finally:
            self._end(stream, finish)

    async def _choice_events(self, streams: list[RequestStream], stops: list[str]):
        """(choice index, _events' tuple) of every stream, as they come; an error in one ends all."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            try:
                async for event in self._events(stream, stops):
                    queue.put_nowait((i, event))
                queue.put_nowait((i, None))
            except Exception as err:  # noqa: BLE001 - re-raised below, in the consumer
                queue.put_nowait((i, err))

        tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
        try:
            running = len(tasks)
            while running:
                i, event = await queue.get()
                if isinstance(event, Exception):
                    raise event
                if event is None:
                    running -= 1
                else:
                    yield i, event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._end_all(streams)

    async def _collect_all(self, request: Request, streams: list[RequestStream], stops: list[str]) -> list[_Result]:
        tasks = [asyncio.ensure_future(self._collect(request, stream, stops)) for stream in streams]
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # a choice that failed takes the others down
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._end_all(streams)

    async def _collect(self, request: Request, stream: RequestStream, stops: list[str]) -> _Result:
        """The whole generation; aborts it if the client disconnects first."""
        async def run():
            ids, text, logprobs, offsets, length, finish = [], [], [], [], 0, None
            async for delta, piece, finish, step_logprobs in self._events(stream, stops):
                ids += delta
                text.append(piece)
                logprobs += step_logprobs or []
                offsets += [length] * len(step_logprobs or [])
                length += len(piece)
            return _Result(ids, "".join(text), finish, logprobs, offsets)

        task = asyncio.ensure_future(run())
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()  # the client left (or this handler was cancelled): abort, free the blocks
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise APIError(499, "the client closed the connection", code="client_closed_request")
        return task.result()

    @staticmethod
    def _usage(prompt_len: int, completion_len: int) -> dict:
        return {"prompt_tokens": prompt_len, "completion_tokens": completion_len,
                "total_tokens": prompt_len + completion_len}

    def _sse(self, chunks, streams: list[RequestStream]) -> StreamingResponse:
        async def body():
            async for chunk in chunks:
                yield f"data: {_dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return _EventStream(body(), on_close=lambda: self._end_all(streams))

    # -- endpoints ------------------------------------------------------------------------------
    async def health(self):
        if not self.engine.is_running:
            reason = f"the engine stopped: {self.engine.error!r}" if self.engine.error else "the engine is shut down"
            return JSONResponse(APIError(503, reason, type="server_error", code="unavailable").body(), 503)
        return {"status": "ok"}

    async def metrics_text(self):
        try:
            stats = await self.engine.stats()
        except EngineClosed:
            stats = {}
        return Response(self.metrics.render(stats), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request: Request):
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "anygpt-engine", "root": self.model_name,
                                            "max_model_len": self.max_model_len}]}

    async def completions(self, request: Request):
        body = await self._json(request)
        fields = Fields(body)
        protocol.check_unsupported(fields)
        prompt = protocol.completion_prompt(body, self.tokenizer, self.vocab_size)
        options = protocol.options(fields)
        params, stops = protocol.sampling(fields, len(prompt), self.max_model_len, self.vocab_size,
                                          defaults=SamplingParams(), max_tokens_default=COMPLETIONS_MAX_TOKENS,
                                          has_tokenizer=self.tokenizer is not None,
                                          logprobs=protocol.completion_logprobs(fields))
        echo = await self._echo(prompt, params.logprobs) if fields.boolean("echo", False) else None
        n = protocol.choices(fields)
        candidates = protocol.best_of(fields, n, options.stream)
        # Ranking best_of candidates needs their tokens' log-probabilities even when not returned.
        run = params if candidates == n or params.logprobs is not None else dataclasses.replace(params, logprobs=0)
        streams = await self._start_choices(prompt, run, candidates)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def choice(i, text, ids, finish, first=False, logprobs=None, offsets=()):
            scored = ids
            if first and echo is not None:  # the prompt comes first: its text, and its tokens' logprobs
                text, scored, logprobs = echo.text + text, prompt + ids, echo.logprobs + (logprobs or [])
                offsets = echo.text_offsets + [len(echo.text) + o for o in offsets]
            c = {"index": i, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
            if params.logprobs is not None:
                c["logprobs"] = protocol.completion_logprobs_body(scored, logprobs or [], offsets, self._token_text)
            if options.return_token_ids:
                c["token_ids"] = ids
                if first:
                    c["prompt_token_ids"] = prompt
            return c

        def envelope(choices):
            return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": choices}

        if not options.stream:
            results = await self._collect_all(request, streams, stops)
            usage = self._usage(len(prompt), sum(len(r.token_ids) for r in results))  # every candidate counts
            if candidates > n:  # OpenAI's "best": the highest log-probability per token
                results = sorted(results, key=lambda r: -sum(e.logprob for e in r.logprobs) / max(len(r.logprobs), 1))
                results = results[:n]
            response = envelope([choice(i, r.text, r.token_ids, r.finish_reason, first=True, logprobs=r.logprobs,
                                        offsets=r.text_offsets) for i, r in enumerate(results)])
            response["usage"] = usage
            return response

        async def chunks():
            started, count, length = set(), 0, [0] * len(streams)
            async for i, (delta, text, finish, logprobs) in self._choice_events(streams, stops):
                count += len(delta)
                if delta or text or finish:
                    yield envelope([choice(i, text, delta, finish, i not in started, logprobs,
                                           [length[i]] * len(logprobs or []))])
                    started.add(i)
                length[i] += len(text)
            if options.include_usage:
                yield {**envelope([]), "usage": self._usage(len(prompt), count)}

        return self._sse(chunks(), streams)

    # -- chat -----------------------------------------------------------------------------------
    async def _message_text(self, i: int, content) -> str:
        """A message's content as template text: text parts as they are, input_audio parts as
        their speech tokens (<sosp>...<eosp>), image_url parts as their image tokens
        (<soim>...<eoim>), joined by spaces."""
        if content is None or isinstance(content, str):
            return content or ""
        if not isinstance(content, list):
            raise bad(f"messages[{i}].content", "content must be a string or a list of content parts")
        pieces = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise bad(where, "a text part needs a string 'text'")
                pieces.append(part["text"])
            elif kind == "input_audio":
                pieces.append(await self._audio_part(where, part.get("input_audio")))
            elif kind == "image_url":
                pieces.append(await self._image_part(f"{where}.image_url", part.get("image_url")))
            else:
                raise bad(where, f"content part type {kind!r} is not supported (expected 'text', 'input_audio' or "
                                 "'image_url')")
        return " ".join(p for p in pieces if p)

    async def _audio_part(self, where: str, audio) -> str:
        self._need_speech("input_audio", output=False)
        if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
            raise bad(where, "input_audio needs {'data': base64 audio, 'format': 'wav'}")
        if audio.get("format", "wav") != "wav":
            raise bad(where, f"input_audio format {audio.get('format')!r} is not supported (expected 'wav')")
        try:
            data = base64.b64decode(audio["data"], validate=True)
        except (binascii.Error, ValueError):
            raise bad(where, "input_audio data is not valid base64") from None
        return await self._speech_string(where, data)

    async def _image_part(self, where: str, image_url) -> str:
        images = self._need_images(where, output=False)
        url = image_url.get("url") if isinstance(image_url, dict) else image_url
        if not isinstance(url, str):
            raise bad(where, "image_url needs {'url': 'data:image/png;base64,...'}")
        try:
            data = data_url_bytes(where, url)
            ids = await asyncio.to_thread(images.prompt_ids, where, data)
        except ValueError as err:
            raise bad(where, str(err)) from None
        return "".join(self.tokenizer.id_to_token(t) for t in ids)

    async def _speech_string(self, where: str, data: bytes) -> str:
        try:
            wav, rate = read_wav_bytes(where, data)
        except ValueError as err:
            raise bad(where, str(err)) from None
        ids = await asyncio.to_thread(self.speech.prompt_ids, wav, rate)
        return "".join(self.tokenizer.id_to_token(t) for t in ids)

    async def _echo(self, prompt: list[int], logprobs: int | None) -> _Result:
        """The prompt as `echo` returns it: its text (decoded token by token, so each token's
        offset in it is exact) and, with logprobs, each token's given the ones before it (the first
        has none: null)."""
        texts = []
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(self.tokenizer)
            texts = [detokenizer.add([t], final=i == len(prompt) - 1) for i, t in enumerate(prompt)]
        offsets = list(itertools.accumulate(map(len, texts[:-1]), initial=0)) if texts else [0] * len(prompt)
        entries = []
        if logprobs is not None:
            try:
                entries = await self.engine.call(lambda engine: engine.prompt_logprobs(prompt, logprobs))
            except EngineClosed as err:
                raise APIError(503, str(err), type="server_error", code="unavailable") from None
        return _Result(prompt, "".join(texts), None, entries, offsets)

    def _token_text(self, token_id: int) -> str:
        """A token as text in logprobs: its own decoding, or token_id:N without a tokenizer."""
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"

    def _chat_stop_ids(self, extra=()) -> tuple[int, ...]:
        ids = (self.tokenizer.token_to_id(self.template.assistant_end), self.tokenizer.eos_token_id, *extra)
        return tuple(dict.fromkeys(t for t in ids if t is not None))

    def _modality_ids(self, modality: str) -> set[int]:
        vocab = self.engine.vocab
        return {*vocab.range(modality), vocab.start_token(modality), vocab.end_token(modality)}

    async def _synthesize(self, token_ids: list[int], audio_format: str = "wav", voice: str | None = None) -> bytes:
        return await asyncio.to_thread(self.speech.synthesize, token_ids, audio_format, voice)

    def _voice(self, param: str, name) -> str | None:
        """A request's voice name, checked against the server's voices (--voices) up front."""
        if name is not None and not isinstance(name, str):
            raise bad(param, f"{param} must be a voice name (a string)")
        try:
            self.speech.voice_prompt(name)
        except ValueError as err:
            raise bad(param, str(err), "voice_not_found") from None
        return name

    async def chat_completions(self, request: Request):
        body = await self._json(request)
        self._need_tokenizer("/v1/chat/completions")
        fields = Fields(body)
        protocol.check_unsupported(fields)
        if fields.get("best_of") is not None:
            raise bad("best_of", "best_of is a /v1/completions field (chat has n)")
        modalities = fields.get("modalities", ["text"])
        if (not isinstance(modalities, list) or not modalities or not set(modalities) <= {"text", "audio", "image"}
                or {"audio", "image"} <= set(modalities)):
            raise bad("modalities", f"modalities={modalities!r}, expected ['text'], ['text', 'audio'] or "
                                    "['text', 'image']")
        audio_out, image_out = "audio" in modalities, "image" in modalities
        audio_format, voice = "wav", None
        if audio_out:
            self._need_speech("audio output", output=True)
            audio = fields.get("audio", {})
            audio_format = audio.get("format", "wav") if isinstance(audio, dict) else None
            voice = self._voice("audio.voice", audio.get("voice")) if isinstance(audio, dict) else None
            if audio_format not in ("wav", "pcm16"):
                raise bad("audio", "audio output supports {'format': 'wav'} and {'format': 'pcm16'} (16 kHz mono; "
                                   "streamed as it is spoken)")
        if image_out:
            self._need_images("modalities", output=True)
        forced = "speech" if audio_out else "image" if image_out else None
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("messages", "messages must be a non-empty list")
        rendered = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise bad(f"messages[{i}]", "a message must be an object with 'role' and 'content'")
            rendered.append({"role": m.get("role"), "content": await self._message_text(i, m.get("content"))})
        try:
            text = self.template.render(rendered, force_modality=forced)
        except (ValueError, TypeError) as err:
            raise bad("messages", str(err)) from None
        prompt = self.tokenizer.encode(text)
        defaults, max_tokens, extra_stops = chat_params(forced or "text"), None, ()
        if image_out:
            # The reply is one image: <eoim> ends it, and cannot come before SEED's 32 codes.
            codes = self.images.tokenizer.num_tokens
            defaults, max_tokens = dataclasses.replace(defaults, min_new_tokens=codes), codes + 1
            extra_stops = (self.engine.vocab.end_token("image"),)
        options = protocol.options(fields)
        params, stops = protocol.sampling(fields, len(prompt), self.max_model_len, self.vocab_size, defaults=defaults,
                                          max_tokens_default=max_tokens or defaults.max_new_tokens, has_tokenizer=True,
                                          stop_ids=self._chat_stop_ids(extra_stops),
                                          logprobs=protocol.chat_logprobs(fields))

        def chat_logprobs(entries):
            if params.logprobs is None:
                return None
            return protocol.chat_logprobs_body(entries or [], self._token_text)
        n = protocol.choices(fields)
        if n > 1 and forced:
            raise bad("n", f"n={n} with {forced} output: one choice per request is supported for audio and image "
                           "replies")
        skip = set(params.stop_token_ids or ()) | (self._modality_ids(forced) if forced else set())
        streams = await self._start_choices(prompt, params, n, skip_text_ids=skip)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def envelope(choices, chunk=False):
            return {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion", "created": created,
                    "model": self.model_name, "choices": choices}

        async def image_reply(token_ids):
            urls = await asyncio.to_thread(self.images.draw, token_ids, params.seed, opened=True)
            return [{"type": "image_url", "image_url": {"url": url}} for url in urls]

        audio_id = f"audio-{uuid.uuid4().hex}"

        async def audio_reply(token_ids, transcript):
            data = await self._synthesize(token_ids, audio_format, voice)
            return {"id": audio_id, "data": base64.b64encode(data).decode(),
                    "expires_at": int(time.time()) + 3600, "transcript": transcript}

        def audio_chunk(i, audio):
            return envelope([{"index": i, "delta": {"audio": {"id": audio_id, **audio}}, "logprobs": None,
                              "finish_reason": None}], chunk=True)

        if not options.stream:
            results = await self._collect_all(request, streams, stops)
            choices = []
            for i, result in enumerate(results):
                message = {"role": "assistant", "content": result.text}
                if audio_out:
                    message["audio"] = await audio_reply(result.token_ids, result.text)
                if image_out:
                    message["images"] = await image_reply(result.token_ids)
                c = {"index": i, "message": message, "logprobs": chat_logprobs(result.logprobs),
                     "finish_reason": result.finish_reason}
                if options.return_token_ids:
                    c["token_ids"] = result.token_ids
                choices.append(c)
            response = envelope(choices)
            if options.return_token_ids:
                response["prompt_token_ids"] = prompt
            response["usage"] = self._usage(len(prompt), sum(len(r.token_ids) for r in results))
            return response

        async def chunks():
            head = envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(n)], chunk=True)
            if options.return_token_ids:
                head["prompt_token_ids"] = prompt
            yield head
            ids, texts = [[] for _ in range(n)], [[] for _ in range(n)]
            # pcm16 audio goes out while the reply is spoken; a wav comes whole at the end
            spoken = self.speech.stream(asyncio.get_running_loop(), voice) if audio_format == "pcm16" else None
            try:
                async for i, (delta, text, finish, logprobs) in self._choice_events(streams, stops):
                    ids[i] += delta
                    texts[i].append(text)
                    if spoken is not None:
                        spoken.feed(delta)
                        for data in spoken.ready() if finish is None else [d async for d in spoken.rest()]:
                            yield audio_chunk(i, {"data": base64.b64encode(data).decode()})
                        if finish is not None:
                            yield audio_chunk(i, {"transcript": "".join(texts[i]),
                                                  "expires_at": int(time.time()) + 3600})
                    elif audio_out and finish is not None:
                        yield audio_chunk(i, await audio_reply(ids[i], "".join(texts[i])))
                    if image_out and finish is not None:
                        yield envelope([{"index": i, "delta": {"images": await image_reply(ids[i])},
                                         "logprobs": None, "finish_reason": None}], chunk=True)
                    if delta or text or finish:
                        c = {"index": i, "delta": {"content": text} if text else {},
                             "logprobs": chat_logprobs(logprobs), "finish_reason": finish}
                        if options.return_token_ids:
                            c["token_ids"] = delta
                        yield envelope([c], chunk=True)
            finally:
                if spoken is not None:
                    spoken.end()  # a client that left: the worker thread stops
            if options.include_usage:
                yield {**envelope([], chunk=True), "usage": self._usage(len(prompt), sum(map(len, ids)))}

        return self._sse(chunks(), streams)

    # -- audio ----------------------------------------------------------------------------------
    async def _reply_tokens(self, request, prompt: list[int], params: SamplingParams, skip=()) -> _Result:
        stream = await self._start(prompt, params, skip_text_ids=skip)
        return await self._collect(request, stream, [])

    async def audio_speech(self, request: Request):
        body = await self._json(request)
        self._need_tokenizer("/v1/audio/speech")
        speech = self._need_speech("/v1/audio/speech", output=True)
        fields = Fields(body)
        text = fields.string("input")
        if not text or not text.strip():
            raise bad("input", "input must be a non-empty string (the text to speak)")
        voice = self._voice("voice", fields.get("voice"))
        response_format = fields.string("response_format", "wav")
        if response_format not in ("wav", "pcm"):
            raise bad("response_format", f"response_format={response_format!r}: 'wav' or 'pcm' (16 kHz mono 16-bit "
                                         "samples, streamed as they are spoken)")
        if fields.number("speed", 1.0) != 1.0:
            raise bad("speed", "speed other than 1.0 is not supported")
        message = [{"role": "user", "content": TEXT_TO_SPEECH.format(text=text.strip())}]
        prompt = self.tokenizer.encode(self.template.render(message, force_modality="speech"))
        eosp = self.engine.vocab.end_token("speech")
        params, _ = protocol.sampling(fields, len(prompt), self.max_model_len, self.vocab_size,
                                      defaults=chat_params("speech"), max_tokens_default=chat_params("speech")
                                      .max_new_tokens, has_tokenizer=True, stop_ids=self._chat_stop_ids((eosp,)))
        if response_format == "wav":
            result = await self._reply_tokens(request, prompt, params)
            return Response(await self._synthesize(result.token_ids, "wav", voice), media_type="audio/wav")
        stream = await self._start(prompt, params)
        spoken = speech.stream(asyncio.get_running_loop(), voice)

        async def pcm():
            try:
                async for delta, _, finish, _ in self._events(stream, []):
                    spoken.feed(delta)
                    for data in spoken.ready() if finish is None else [d async for d in spoken.rest()]:
                        yield data
            finally:
                spoken.end()

        return _EventStream(pcm(), on_close=lambda: (self._end(stream, None), spoken.end()),
                            media_type="audio/pcm")

    async def audio_transcriptions(self, request: Request):
        self._authorize(request)
        self._need_tokenizer("/v1/audio/transcriptions")
        self._need_speech("/v1/audio/transcriptions", output=False)
        try:
            form = await request.form()
        except APIError:
            raise
        except Exception as err:  # noqa: BLE001 - a malformed multipart body
            raise bad(None, f"expected a multipart/form-data body with a 'file': {err}") from None
        self._check_model(form.get("model"))
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise bad("file", "file is required (the audio to transcribe, as wav)")
        data = await upload.read()
        fields = Fields({k: _form_value(k, v) for k, v in form.items() if k in ("temperature", "seed", "max_tokens")})
        response_format = form.get("response_format") or "json"
        if response_format not in ("json", "text"):
            raise bad("response_format", f"response_format={response_format!r}, expected 'json' or 'text'")
        spoken = await self._speech_string("file", data)
        message = [{"role": "user", "content": SPEECH_TO_TEXT.format(speech=spoken)}]
        prompt = self.tokenizer.encode(self.template.render(message))
        defaults = dataclasses.replace(chat_params("text"), temperature=0.0)  # OpenAI's default: greedy
        params, _ = protocol.sampling(fields, len(prompt), self.max_model_len, self.vocab_size, defaults=defaults,
                                      max_tokens_default=defaults.max_new_tokens, has_tokenizer=True,
                                      stop_ids=self._chat_stop_ids())
        result = await self._reply_tokens(request, prompt, params, skip=params.stop_token_ids or ())
        text = parse_reply(result.text, self.template).text if result.text else ""
        if response_format == "text":
            return PlainTextResponse(text)
        return {"text": text}


def _form_value(name: str, value):
    """A multipart form's number field as JSON would carry it."""
    try:
        return float(value) if name == "temperature" else int(value)
    except (TypeError, ValueError):
        raise bad(name, f"{name}={value!r} is not a number") from None


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (its body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def build_app(engine: AsyncEngine, **kwargs) -> FastAPI:
    """The FastAPI application over an AsyncEngine (see OpenAIServer for the options)."""
    return OpenAIServer(engine, **kwargs).app


def run(server: OpenAIServer, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
        access_log: bool = False) -> None:
    """Serves until SIGINT/SIGTERM; the engine then drains (for a bounded time) and stops. An
    engine stopped by an error (a lost tensor-parallel rank, a device fault) stops the server too,
    and the error is raised here: a server that can only answer 503 should exit so that its
    supervisor restarts it."""
    import uvicorn

    http = uvicorn.Server(uvicorn.Config(server.app, host=host, port=port, log_level=log_level,
                                         access_log=access_log, timeout_graceful_shutdown=10))

    def stop_when_the_engine_stops():
        server.engine.wait()
        http.should_exit = True

    threading.Thread(target=stop_when_the_engine_stops, name="anygpt-engine-watch", daemon=True).start()
    # uvicorn re-raises the SIGINT/SIGTERM that stopped it once it has shut down; a graceful stop
    # returns here instead (a tensor-parallel rank 0 must still release its followers).
    on_main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: None) for s in signals} if on_main else {}
    try:
        http.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if server.engine.error is not None:
        raise server.engine.error
