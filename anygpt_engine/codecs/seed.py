"""SEED as a codec: images <-> 32 codes of an 8,192-entry codebook (what AnyGPT's LLM reads and
writes between <soim> and <eoim>), and codes -> the unCLIP image embedding -> a picture drawn by
Stable Diffusion 2.1 unCLIP.

    tok = codecs.SeedImageTokenizer.from_pretrained("seed-tokenizer-2/", diffusion_path="sd-2-1-unclip/")
    codes = tok.encode([Image.open("cat.jpg")])     # int64 [1, 32]
    embedding = tok.embed(codes)                     # float32 [1, 1024]
    pictures = tok.decode(codes, seed=0)             # [PIL.Image], 768 x 768 with SD 2.1 unCLIP

The network is models/seed.py; the quantizer's argmin and codebook lookup are ops.rvq_encode /
ops.rvq_decode with one level, so codes follow the float32 RVQ contract (ops/rvq.py) on the
network's features. AnyGPT runs the whole tokenizer in fp16 (`fp16=True`, model.half(), the
argmin's expanded form in fp16 too); here the network runs in `dtype` (default float16 on CUDA,
float32 on a CPU) and the argmin always in exact float32.

Input as AnyGPT's ImageTokenizer.processor prepares it (seed_llama_tokenizer.py): PIL images are
converted to RGB, resized to image_size x image_size with PIL's bicubic filter (torchvision's
Resize((224, 224), interpolation=3) on a PIL image; no crop), scaled to [0, 1] in float32
(ToTensor) and normalised with CLIP's mean and std. Tensors must already be that.

Decoding (ImageTokenizer.decode): the embedding conditions diffusers' StableUnCLIPImg2ImgPipeline
with noise_level 0, an empty prompt, guidance_scale 10 and 20 steps by default. The
unconditional branch of classifier-free guidance is the zero embedding, or with negative_codes
the negatives' embedding noised at level 0, as AnyGPT's vendored pipeline does
(negative_image_embeds). The pipeline is optional: `pip install 'anygpt-engine[image]'`.
"""

from __future__ import annotations

import functools
import io
import math
import os
import threading
from pathlib import Path

import numpy as np
import torch

from anygpt_engine import ops
from anygpt_engine.codecs.loaders import load_state_dict, seed_codebook
from anygpt_engine.models.seed import SeedConfig, SeedNet, load_network
from anygpt_engine.ops.rvq import RVQCodebooks

QUANTIZER_FILE = "seed_quantizer.pt"
VIT_FILE = "eva_vit_g.pth"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INSTALL_HINT = "pip install 'anygpt-engine[image]' (or: pip install diffusers transformers pillow)"


class SeedImageTokenizer:
    """encode(images) -> int64 [B, num_query_tokens]; embed(codes) -> float32 [B, image_embed_dim];
    decode(codes) -> PIL images (needs a diffusion pipeline: diffusion_path= or load_diffusion)."""

    def __init__(self, config: SeedConfig, state, vit_state=None, device=None, dtype=None, seed: int = 0):
        """`state`: seed_quantizer.pt's tensors; `vit_state`: eva_vit_g.pth's. state None gives random
        weights and codebook from `seed` (benchmarks)."""
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"dtype={dtype}, expected torch.float32, float16, bfloat16 or float64")
        self.dtype = dtype
        self.config = config
        with torch.device("meta"):  # every parameter is then loaded or drawn: skip torch's initialisation
            self.net = SeedNet(config)
        self.net.to_empty(device=self.device)
        if state is None:
            self.net.init_random(seed)
            generator = torch.Generator().manual_seed(seed + 1)
            books = RVQCodebooks(torch.randn(1, config.codebook_size, config.codebook_dim, generator=generator)
                                 .mul_(config.codebook_dim ** -0.5).to(self.device))
        else:
            books = seed_codebook(state, device=self.device)
            load_network(self.net, state, vit_state)
        if books.codebook_size != config.codebook_size or books.dim != config.codebook_dim:
            raise ValueError(f"SEED codebook {tuple(books.embed.shape[1:])} does not match the config "
                             f"(codebook_size={config.codebook_size}, codebook_dim={config.codebook_dim})")
        self.codebooks = books
        self.net.to(device=self.device, dtype=self.dtype).eval()
        self.diffusion = None  # a StableUnCLIPImg2ImgPipeline, set by load_diffusion
        self._diffusion_lock = threading.Lock()  # one pipeline call at a time (its scheduler is stateful)

    @classmethod
    def from_pretrained(cls, path, vit_path=None, config=None, device=None, dtype=None,
                        diffusion_path=None) -> "SeedImageTokenizer":
        """AnyGPT's published files: `path` is seed_quantizer.pt (a plain state dict without the ViT)
        or a directory holding it; `vit_path` is LAVIS's eva_vit_g.pth, by default the one beside
        it (not needed when seed_quantizer.pt carries visual_encoder.* itself). `config`: None for
        the published sizes, a dict, a SeedConfig or a JSON path. `diffusion_path`: an optional
        Stable Diffusion 2.1 unCLIP pipeline directory for decode (see load_diffusion)."""
        path = Path(path)
        quantizer_path = path / QUANTIZER_FILE if path.is_dir() else path
        if not quantizer_path.is_file():
            raise FileNotFoundError(f"no SEED quantizer checkpoint at {quantizer_path}")
        state = load_state_dict(quantizer_path)
        if vit_path is None:
            vit_path = quantizer_path.parent / VIT_FILE
            if not vit_path.is_file() and any(k.startswith("visual_encoder.") for k in state):
                vit_path = None
            elif not vit_path.is_file():
                raise FileNotFoundError(f"no ViT weights: {vit_path} does not exist and {quantizer_path} holds no "
                                        "visual_encoder.* tensors; pass vit_path= (LAVIS's eva_vit_g.pth)")
        vit_state = load_state_dict(vit_path) if vit_path is not None else None
        tokenizer = cls(SeedConfig.from_any(config), state, vit_state, device, dtype)
        if diffusion_path is not None:
            tokenizer.load_diffusion(diffusion_path)
        return tokenizer

    def __repr__(self) -> str:
        c = self.config
        return (f"SeedImageTokenizer({c.num_query_tokens} codes of {c.codebook_size} per {c.image_size}x"
                f"{c.image_size} image, {self.dtype}, {self.device}, diffusion={'yes' if self.diffusion else 'no'})")

    @property
    def num_tokens(self) -> int:
        return self.config.num_query_tokens

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    # -- images -> codes ---------------------------------------------------------------------
    def preprocess(self, images) -> torch.Tensor:
        """PIL image(s) or a preprocessed tensor -> float32 [B, 3, S, S] on the device (module doc)."""
        if isinstance(images, torch.Tensor):
            return self._check_pixels(images)
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("images is an empty list, expected at least one image")
        for i, item in enumerate(items):
            if not _is_pil(item):
                where = f"images[{i}]" if isinstance(images, (list, tuple)) else "images"
                raise TypeError(f"{where} is a {type(item).__name__}, expected a PIL.Image.Image (or pass a "
                                "preprocessed float tensor [B, 3, S, S] as images)")
        return torch.stack([self._pil_pixels(item) for item in items]).to(self.device)

    def _pil_pixels(self, image) -> torch.Tensor:
        from PIL import Image

        size = self.config.image_size
        image = image.convert("RGB").resize((size, size), Image.BICUBIC)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
        std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
        return (pixels - mean) / std

    def _check_pixels(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if not images.dtype.is_floating_point:
            raise TypeError(f"images.dtype={images.dtype}, expected a float tensor already preprocessed "
                            "(CLIP-normalised); pass PIL images to have them preprocessed")
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"images.shape={tuple(images.shape)}, expected [B, 3, {size}, {size}] (RGB, preprocessed)")
        if images.shape[0] == 0:
            raise ValueError(f"images.shape={tuple(images.shape)} is an empty batch, expected at least one image")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images contain NaN or inf values")
        return images.to(device=self.device, dtype=torch.float32)

    @torch.inference_mode()
    def features(self, images) -> torch.Tensor:
        """float32 [B, num_query_tokens, codebook_dim]: what the quantizer reads (encode_task_layer's output)."""
        pixels = self.preprocess(images)
        return self.net.features(pixels.to(self.dtype)).float()

    def encode(self, images) -> torch.Tensor:
        """Codes int64 [B, num_query_tokens] of PIL image(s) (a single image gives B = 1) or of a
        preprocessed float tensor [B, 3, S, S]; each image is coded on its own."""
        features = self.features(images)
        return ops.rvq_encode(features, self.codebooks)[0]  # one level: [1, B, Q] -> [B, Q]

    # -- codes -> embedding -> picture ------------------------------------------------------
    def _check_codes(self, name: str, codes) -> torch.Tensor:
        """codes as int64 [B, num_query_tokens] on the device; raises naming `name` for anything else."""
        if not isinstance(codes, torch.Tensor):
            if not isinstance(codes, (list, tuple, np.ndarray)):
                raise TypeError(f"{name} must be a torch.Tensor (or list, numpy array) of integer codes, got "
                                f"{type(codes).__name__}")
            codes = torch.as_tensor(codes)
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise TypeError(f"{name}.dtype={codes.dtype}, expected integer codes (int64)")
        q = self.num_tokens
        if codes.dim() == 1:
            codes = codes[None]
        if codes.dim() != 2 or codes.shape[1] != q:
            raise ValueError(f"{name}.shape={tuple(codes.shape)}, expected [B, {q}] or [{q}] ({q} codes per image)")
        if codes.shape[0] == 0:
            raise ValueError(f"{name}.shape={tuple(codes.shape)} is an empty batch, expected at least one image")
        codes = codes.to(device=self.device, dtype=torch.int64)
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bool(bad.any()):
            where = bad.nonzero()[0].tolist()
            raise ValueError(f"{name}[{where[0]}, {where[1]}]={codes[where[0], where[1]].item()} is out of range, "
                             f"expected 0 <= code < {self.codebook_size}")
        return codes

    def embed(self, codes) -> torch.Tensor:
        """float32 [B, image_embed_dim]: the unCLIP image embedding of codes [B, Q] or [Q]
        (SEED's get_codebook_entry)."""
        return self._embed(self._check_codes("codes", codes))

    @torch.inference_mode()
    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        codewords = ops.rvq_decode(codes[None], self.codebooks, check_codes=False)  # [B, Q, codebook_dim]
        return self.net.embed(codewords.to(self.dtype)).float()

    def load_diffusion(self, source, dtype=None) -> None:
        """Sets the pipeline decode draws with: a Stable Diffusion 2.1 unCLIP directory (diffusers'
        layout, e.g. stabilityai/stable-diffusion-2-1-unclip downloaded) or an existing
        diffusers.StableUnCLIPImg2ImgPipeline. It runs on this tokenizer's device, in `dtype`
        (default: the tokenizer's). Its image embedding width must be image_embed_dim."""
        pipeline_class = _unclip_pipeline_class()
        from diffusers import StableUnCLIPImg2ImgPipeline

        dtype = dtype if dtype is not None else self.dtype
        if isinstance(source, StableUnCLIPImg2ImgPipeline):
            pipeline = source
        elif isinstance(source, (str, os.PathLike)):
            if not Path(source).is_dir():
                raise FileNotFoundError(f"no Stable Diffusion unCLIP pipeline directory at {source}")
            # In its stored precision (diffusers renamed torch_dtype to dtype); .to(dtype) below casts it.
            pipeline = StableUnCLIPImg2ImgPipeline.from_pretrained(str(source))
        else:
            raise TypeError(f"source must be a pipeline directory or a StableUnCLIPImg2ImgPipeline, got "
                            f"{type(source).__name__}")
        width = pipeline.unet.config.projection_class_embeddings_input_dim
        if width != 2 * self.config.image_embed_dim:
            raise ValueError(f"the unCLIP UNet takes {width // 2}-d image embeddings (plus the noise-level "
                             f"embedding), expected image_embed_dim={self.config.image_embed_dim}")
        pipeline = pipeline_class(**pipeline.components).to(device=self.device, dtype=dtype)
        pipeline.set_progress_bar_config(disable=True)
        self.diffusion = pipeline

    def decode(self, codes, negative_codes=None, guidance_scale: float = 10.0, num_inference_steps: int = 20,
               seed: int | None = None, height: int | None = None, width: int | None = None) -> list:
        """PIL images of codes [B, Q] (or [Q]) drawn by the unCLIP pipeline (AnyGPT's settings by
        default). `negative_codes` (same shape) replace the zero embedding of guidance's
        unconditional branch. `seed`: item i draws its noise from a generator seeded seed + i, so
        an item's picture does not depend on the rest of the batch; None draws from torch's global
        RNG. height/width default to the pipeline's native size (768 for SD 2.1 unCLIP)."""
        if self.diffusion is None:
            raise RuntimeError("decode needs a Stable Diffusion 2.1 unCLIP pipeline: pass diffusion_path= to "
                               "from_pretrained or call load_diffusion(path)")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(
                guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale!r}, expected a finite number >= 0 (> 1 enables guidance)")
        _check_int("num_inference_steps", num_inference_steps, 1)
        for name, value, low in (("seed", seed, 0), ("height", height, 8), ("width", width, 8)):
            if value is not None:
                _check_int(name, value, low)
        codes = self._check_codes("codes", codes)
        negatives = None
        if negative_codes is not None:
            negative_codes = self._check_codes("negative_codes", negative_codes)
            if negative_codes.shape != codes.shape:
                raise ValueError(f"negative_codes.shape={tuple(negative_codes.shape)}, expected {tuple(codes.shape)} "
                                 "like codes")
        pipeline = self.diffusion
        device, dtype = pipeline._execution_device, pipeline.unet.dtype
        embeds = self._embed(codes).to(device=device, dtype=dtype)
        if negative_codes is not None:
            negatives = self._embed(negative_codes).to(device=device, dtype=dtype)
        batch = codes.shape[0]
        generators = None if seed is None else [torch.Generator(device).manual_seed(seed + i) for i in range(batch)]
        with self._diffusion_lock:
            pipeline.negative_image_embeds = negatives
            try:
                result = pipeline(prompt=[""] * batch, image_embeds=embeds, guidance_scale=float(guidance_scale),
                                  num_inference_steps=num_inference_steps, generator=generators, noise_level=0,
                                  height=height, width=width, output_type="pil")
            finally:
                pipeline.negative_image_embeds = None
        return list(result.images)


def read_image(name: str, source):
    """An RGB PIL image, fully read, from an image file's path or bytes (whatever PIL reads: png,
    jpeg, webp, ...). FileNotFoundError for a missing path; ValueError naming `name` when PIL
    cannot read it."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(f"reading images needs pillow: {INSTALL_HINT}") from e
    if isinstance(source, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(source)
    else:
        stream = Path(source)
        if not stream.is_file():
            raise FileNotFoundError(f"{name}: no image file at {stream}")
    try:
        with Image.open(stream) as image:
            return image.convert("RGB")
    # PIL raises OSError (UnidentifiedImageError, truncated data), ValueError, SyntaxError (some
    # decoders) or DecompressionBombError for what it cannot or will not read.
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{name} is not an image PIL can read (expected png, jpeg, ...): {err}") from None


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}, expected an int >= {low}")


def _is_pil(obj) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(obj, Image.Image)


@functools.lru_cache(maxsize=1)
def _unclip_pipeline_class():
    """diffusers' StableUnCLIPImg2ImgPipeline, plus AnyGPT's negative image embeddings: when
    `negative_image_embeds` is set, guidance's unconditional branch is that embedding noised like
    the positive one (noise level 0 in AnyGPT) instead of zeros."""
    try:
        from diffusers import StableUnCLIPImg2ImgPipeline
    except ImportError as e:
        raise ImportError(f"SeedImageTokenizer's decode needs diffusers (Stable Diffusion 2.1 unCLIP): {INSTALL_HINT}"
                          ) from e

    class UnCLIPWithNegatives(StableUnCLIPImg2ImgPipeline):
        negative_image_embeds = None

        def _encode_image(self, **kwargs):
            negatives = self.negative_image_embeds
            if negatives is None or not kwargs["do_classifier_free_guidance"]:
                return super()._encode_image(**kwargs)
            positives = super()._encode_image(**{**kwargs, "do_classifier_free_guidance": False})
            negatives = self.noise_image_embeddings(image_embeds=negatives, noise_level=kwargs["noise_level"],
                                                    generator=kwargs["generator"])
            return torch.cat([negatives.repeat_interleave(kwargs["num_images_per_prompt"], dim=0), positives])

    return UnCLIPWithNegatives
