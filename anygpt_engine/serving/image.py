"""Images for the server: `image_url` content parts (data URLs) in, through the SEED tokenizer:
its 32 codes as `<soim>...<eoim>`; image replies out, SEED's embedding drawn by Stable Diffusion
2.1 unCLIP with AnyGPT's chat settings (guidance 10, 20 steps), as png data URLs.

The server never fetches: an image must come inline, `data:image/png;base64,...` (jpeg, webp,
...: whatever PIL reads); an http(s) URL is refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading

import torch

from anygpt_engine.codecs.seed import read_image
from anygpt_engine.codecs.tokens import image_tokens
from anygpt_engine.vocab import Vocabulary

GUIDANCE_SCALE = 10.0  # AnyGPT's chat (ImageTokenizer.decode's defaults)
NUM_INFERENCE_STEPS = 20


def data_url_bytes(name: str, url: str) -> bytes:
    """The bytes of an image data URL (`data:image/...;base64,...`); ValueError naming `name`
    for anything else, http(s) URLs included (the server does not fetch)."""
    scheme = url.split(":", 1)[0].strip().lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise ValueError(f"{name} is an {scheme} URL; this server does not fetch images: send the image inline as a "
                         "data URL (data:image/png;base64,...)")
    if scheme != "data":
        raise ValueError(f"{name}={url[:40]!r}... is not a data URL, expected data:image/png;base64,... (or "
                         "image/jpeg, ...)")
    header, comma, payload = url.strip()[5:].partition(",")
    params = [p.strip().lower() for p in header.split(";")]
    if not comma or not params[0].startswith("image/") or "base64" not in params[1:]:
        raise ValueError(f"{name} is a data URL of {header!r}, expected data:image/png;base64,... (or image/jpeg, ...)")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name}: the data URL's data is not valid base64") from None
    if not data:
        raise ValueError(f"{name}: the data URL holds no data")
    return data


def png_data_url(picture) -> str:
    """A PIL image as a `data:image/png;base64,...` URL."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class ImageIO:
    """The server's SEED tokenizer: `prompt_ids` turns an image file's bytes into prompt tokens;
    `draw` turns a reply's image spans into png data URLs (needs the tokenizer's unCLIP pipeline,
    `can_draw`). Called off the event loop; encodes run one at a time, and so do drawings (the
    pipeline's lock), but an encode never waits for a drawing."""

    def __init__(self, tokenizer, vocab: Vocabulary | None = None, *, guidance_scale: float = GUIDANCE_SCALE,
                 num_inference_steps: int = NUM_INFERENCE_STEPS):
        self.vocab = vocab if vocab is not None else Vocabulary.anygpt()
        values = self.vocab.span("image").num_values
        if tokenizer.codebook_size != values:
            raise ValueError(f"the SEED tokenizer has {tokenizer.codebook_size} codes, but the vocabulary has {values} "
                             "image tokens; they must match")
        self.tokenizer = tokenizer
        self.guidance_scale = guidance_scale
        self.num_inference_steps = num_inference_steps
        self._encode_lock = threading.Lock()

    @classmethod
    def from_files(cls, image_tokenizer: str | None, image_vit: str | None = None, image_diffusion: str | None = None,
                   device=None, vocab: Vocabulary | None = None) -> "ImageIO | None":
        """From `anygpt-engine serve`'s flags (--image-tokenizer PATH, --image-vit PTH,
        --image-diffusion DIR). None when no image tokenizer is given."""
        if image_tokenizer is None:
            if image_vit is not None or image_diffusion is not None:
                raise ValueError("--image-vit and --image-diffusion need --image-tokenizer PATH")
            return None
        from anygpt_engine.codecs import SeedImageTokenizer

        return cls(SeedImageTokenizer.from_pretrained(image_tokenizer, image_vit, device=device,
                                                      diffusion_path=image_diffusion), vocab)

    @property
    def can_draw(self) -> bool:
        return self.tokenizer.diffusion is not None

    def prompt_ids(self, name: str, data: bytes) -> list[int]:
        """`<soim>` + the image's code ids + `<eoim>`; ValueError naming `name` when `data` is
        not an image PIL reads."""
        picture = read_image(name, data)
        with self._encode_lock:
            codes = self.tokenizer.encode(picture)[0]
        return image_tokens(codes.cpu(), self.vocab, markers=True).tolist()

    def spans(self, reply_ids: list[int], opened: bool = False) -> list[list[int]]:
        """The codes of each `<soim> ... <eoim>` span of a reply (the last may be unclosed);
        `opened`: the reply starts inside a span (its prompt ended with `<soim>`)."""
        start, end = self.vocab.start_token("image"), self.vocab.end_token("image")
        values = self.vocab.range("image")
        spans = [[]] if opened else []
        current = spans[0] if opened else None
        for t in reply_ids:
            if t == start:
                current = []
                spans.append(current)
            elif current is not None and t == end:
                current = None
            elif current is not None and t in values:
                current.append(t - values.start)
        return spans

    def draw(self, reply_ids: list[int], seed: int | None = None, opened: bool = False) -> list[str]:
        """png data URLs of the reply's image spans that hold exactly num_tokens (32) codes,
        in order; picture i draws its noise from seed + i (None: torch's global RNG)."""
        codes = [c for c in self.spans(reply_ids, opened) if len(c) == self.tokenizer.num_tokens]
        if not codes:
            return []
        if seed is not None:
            seed &= 0x7FFFFFFFFFFFFFFF  # request seeds are signed 64-bit, generators' unsigned
        pictures = self.tokenizer.decode(torch.tensor(codes), guidance_scale=self.guidance_scale,
                                         num_inference_steps=self.num_inference_steps, seed=seed)
        return [png_data_url(p) for p in pictures]
