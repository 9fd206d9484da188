"""Images through /v1/chat/completions, on the server's ASGI application in-process (no socket, no
subprocess: the HTTP layer is tests/test_serving.py's) over the tiny preset, a tiny random SEED
with the vocabulary's 8192 codes and a tiny unCLIP pipeline: image_url data URLs (png, jpeg)
become the prompt an in-process Chat builds from the same image; modalities ["text", "image"]
returns the reply's picture as a png data URL, equal to drawing its codes directly, streamed or
not; http(s) URLs, bad base64, non-images and a server without an image tokenizer get 400s that
name the field; `anygpt-engine serve`'s image flags."""

import asyncio
import base64
import dataclasses
import io
import json

import numpy as np
import pytest

from anygpt_engine import ChatTemplate, Engine, cli
from anygpt_engine.chat import chat_params, modality_string
from anygpt_engine.codecs import SeedImageTokenizer
from anygpt_engine.serving.async_engine import AsyncEngine
from anygpt_engine.serving.image import ImageIO
from anygpt_engine.serving.server import OpenAIServer
from anygpt_tokenizers import sentencepiece_model, write_sentencepiece_dir
from image_models import CHAT_CONFIG, TINY, chat_image_tokenizer, picture

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("fastapi")
pytest.importorskip("sentencepiece")
pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")
MODEL = "tiny-chat"


async def _call(app, path: str, payload: dict) -> tuple[int, bytes]:
    """One POST through the ASGI application; the client stays connected until the response ends."""
    body = json.dumps(payload).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    delivered, done, status, chunks = False, asyncio.Event(), [], []

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    await asyncio.wait_for(app(scope, receive, send), timeout=120)
    return status[0], b"".join(chunks)


def chat(server: OpenAIServer, **payload) -> tuple[int, dict | list]:
    """POST /v1/chat/completions: (status, JSON body), or for stream=True (status, [chunks])."""
    status, body = asyncio.run(_call(server.app, "/v1/chat/completions", {"model": MODEL, **payload}))
    if payload.get("stream") and status == 200:
        events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return status, [json.loads(e) for e in events[:-1]]
    return status, json.loads(body)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    return write_sentencepiece_dir(tmp_path_factory.mktemp("sp"), sentencepiece_model())


@pytest.fixture(scope="module")
def reference(sp_dir):
    """An Engine like the server's (the tiny preset's weights are seeded), for references."""
    return Engine("tiny", device="cpu", tokenizer=sp_dir, num_blocks=200)


@pytest.fixture(scope="module")
def seed_tokenizer(tmp_path_factory):
    return chat_image_tokenizer(tmp_path_factory.mktemp("unclip"))


@pytest.fixture(scope="module")
def servers(sp_dir, seed_tokenizer, reference):
    """(a server with the image tokenizer and pipeline, one with the tokenizer only, one with
    neither), over one AsyncEngine."""
    engine = AsyncEngine(Engine("tiny", device="cpu", tokenizer=sp_dir, num_blocks=200, max_batch_size=4),
                         gil_switch_interval=None)
    encoder_only = SeedImageTokenizer(CHAT_CONFIG, None, device="cpu", seed=0)
    try:
        yield (OpenAIServer(engine, model_name=MODEL, images=ImageIO(seed_tokenizer, reference.vocab)),
               OpenAIServer(engine, model_name=MODEL, images=ImageIO(encoder_only, reference.vocab)),
               OpenAIServer(engine, model_name=MODEL))
    finally:
        engine.close()


def data_url(image, fmt="PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(url) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}


def test_data_url_images_become_the_prompt_chat_builds(servers, seed_tokenizer, reference):
    server = servers[0]
    png, jpeg = picture(33, 47, seed=1), picture(50, 20, seed=2)
    jpeg_url = data_url(jpeg, "JPEG")
    content = [image_part(data_url(png)), {"type": "text", "text": "Which one is brighter?"}, image_part(jpeg_url)]
    status, body = chat(server, messages=[{"role": "user", "content": content}], max_tokens=6, seed=3,
                        return_token_ids=True)
    assert status == 200, body
    jpeg_read = Image.open(io.BytesIO(base64.b64decode(jpeg_url.split(",")[1])))  # jpeg is lossy: as decoded
    spell = [modality_string("image", seed_tokenizer.encode(im)[0], reference.vocab, reference.tokenizer)
             for im in (png, jpeg_read)]
    assert spell[0] != spell[1]
    message = f"{spell[0]} Which one is brighter? {spell[1]}"
    prompt = reference.tokenizer.encode(ChatTemplate.anygpt().render([{"role": "user", "content": message}]))
    assert body["prompt_token_ids"] == prompt
    start = prompt.index(reference.vocab.start_token("image"))
    assert prompt[start + 1:start + 33] == reference.vocab.encode_image(seed_tokenizer.encode(png)[0]).tolist()
    params = dataclasses.replace(chat_params("text"), max_new_tokens=6, seed=3, stop_token_ids=(
        reference.tokenizer.token_to_id("<eos>"), reference.tokenizer.eos_token_id))
    assert body["choices"][0]["token_ids"] == reference.generate([prompt], params)[0]


def test_image_reply_comes_back_as_a_png_data_url(servers, seed_tokenizer, reference, monkeypatch):
    server, vocab = servers[0], reference.vocab
    messages = [{"role": "user", "content": "Draw a red square. Please generation an image."}]
    # A trained model closes the image after SEED's 32 codes: <eoim> ends the reply and is held back
    # until then, max_tokens defaults to 33. This random one runs on, so its 33 codes draw nothing.
    requested = []
    add_request = server.engine.add_request

    async def recording(prompt, params, *args, **kwargs):
        requested.append(params)
        return await add_request(prompt, params, *args, **kwargs)

    monkeypatch.setattr(server.engine, "add_request", recording)
    status, body = chat(server, messages=messages, modalities=["text", "image"], seed=5, return_token_ids=True)
    assert status == 200, body
    [params] = requested
    assert (params.min_new_tokens, params.max_new_tokens, params.top_k, params.seed) == (32, 33, 50, 5)
    assert vocab.end_token("image") in params.stop_token_ids
    ids = body["choices"][0]["token_ids"]
    assert len(ids) == 33 and all(t in vocab.range("image") for t in ids)
    assert body["choices"][0]["finish_reason"] == "length" and body["choices"][0]["message"]["images"] == []
    status, body = chat(server, messages=messages, modalities=["text", "image"], seed=5, max_tokens=32,
                        return_token_ids=True)
    assert status == 200, body
    prompt, ids = body["prompt_token_ids"], body["choices"][0]["token_ids"]
    assert prompt == reference.tokenizer.encode(ChatTemplate.anygpt().render(messages, force_modality="image"))
    assert len(ids) == 32 and all(t in vocab.range("image") for t in ids)
    codes = [t - vocab.range("image").start for t in ids]
    assert len(set(codes)) > 5
    message = body["choices"][0]["message"]
    assert message["content"] == ""
    [part] = message["images"]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
    drawn = Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"].split(",", 1)[1])))
    native = seed_tokenizer.diffusion.unet.config.sample_size * seed_tokenizer.diffusion.vae_scale_factor
    assert drawn.format == "PNG" and drawn.size == (native, native)
    expected = np.asarray(seed_tokenizer.decode(codes, seed=5)[0], np.int16)  # guidance 10, 20 steps
    assert np.abs(np.asarray(drawn.convert("RGB"), np.int16) - expected).max() <= 1 and expected.std() > 0

    status, chunks = chat(server, messages=messages, modalities=["text", "image"], seed=5, max_tokens=32, stream=True)
    assert status == 200
    images = [c["choices"][0]["delta"]["images"] for c in chunks if "images" in c["choices"][0]["delta"]]
    assert len(images) == 1 and len(images[0]) == 1 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    streamed = Image.open(io.BytesIO(base64.b64decode(images[0][0]["image_url"]["url"].split(",", 1)[1])))
    assert np.abs(np.asarray(streamed.convert("RGB"), np.int16) - expected).max() <= 1


def test_bad_images_get_400s_naming_the_field(servers):
    server, encoder_only, plain = servers
    good = data_url(picture(9, 9, seed=4))
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    where = "messages[2].content[1].image_url"
    cases = [
        (server, "http://example.com/cat.png", "does not fetch images"),
        (server, "https://example.com/cat.png", "does not fetch images"),
        (server, "data:image/png;base64,%%%not-base64", "not valid base64"),
        (server, "data:image/png;base64," + base64.b64encode(b"not a png at all").decode(), "not an image PIL can"),
        (server, "data:text/plain;base64,aGVsbG8=", "expected data:image/png;base64"),
        (server, "ftp://example.com/cat.png", "is not a data URL"),
        (server, {"detail": "auto"}, "image_url needs {'url'"),
        (plain, good, "this server has no image tokenizer"),
    ]
    for target, url, error in cases:
        part = {"type": "image_url", "image_url": url if isinstance(url, dict) else {"url": url}}
        messages = history + [{"role": "user", "content": [{"type": "text", "text": "Look:"}, part]}]
        status, body = chat(target, messages=messages, max_tokens=2)
        assert status == 400 and body["error"]["param"] == where and error in body["error"]["message"], (url, body)
    for target, error in ((plain, "this server has no image tokenizer"), (encoder_only, "--image-diffusion DIR")):
        status, body = chat(target, messages=history[:1], modalities=["text", "image"])
        assert status == 400 and body["error"]["param"] == "modalities" and error in body["error"]["message"]
    status, body = chat(server, messages=history[:1], modalities=["text", "audio", "image"])
    assert status == 400 and body["error"]["param"] == "modalities"
    # an encoder alone reads images, and every server keeps serving
    messages = [{"role": "user", "content": [image_part(good)]}]
    assert chat(encoder_only, messages=messages, max_tokens=2)[0] == 200
    assert chat(server, messages=messages, max_tokens=2)[0] == 200


def test_serve_flags_and_image_io_checks(tmp_path, reference):
    args = cli.build_parser().parse_args(["serve", "--image-tokenizer", "seed/", "--image-vit", "vit.pth",
                                          "--image-diffusion", "unclip/"])
    assert (args.image_tokenizer, args.image_vit, args.image_diffusion) == ("seed/", "vit.pth", "unclip/")
    assert ImageIO.from_files(None) is None
    with pytest.raises(ValueError, match="--image-vit and --image-diffusion need --image-tokenizer PATH"):
        ImageIO.from_files(None, image_diffusion="unclip/")
    with pytest.raises(FileNotFoundError, match="no SEED quantizer checkpoint"):
        ImageIO.from_files(str(tmp_path / "nothing"))
    small = SeedImageTokenizer(dataclasses.replace(CHAT_CONFIG, codebook_size=TINY["codebook_size"]), None,
                               device="cpu")
    with pytest.raises(ValueError, match="the SEED tokenizer has 300 codes, but the vocabulary has 8192"):
        ImageIO(small, reference.vocab)
