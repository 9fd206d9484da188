"""Small random SEED image tokenizers and a tiny Stable Diffusion unCLIP pipeline, shared by the
SEED codec, chat and serving tests; nothing is downloaded."""

import json
import math

import pytest
import torch

from anygpt_engine.models.seed import SeedConfig

TINY = dict(image_size=56, patch_size=14, vit_width=48, vit_depth=2, vit_heads=4, vit_mlp_dim=100, qformer_hidden=40,
            qformer_layers=3, qformer_heads=5, qformer_intermediate=72, cross_attention_freq=2, num_query_tokens=32,
            codebook_size=300, codebook_dim=12, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=88,
            image_down_dims=[20, 16, 6], image_embed_dim=32)
# The tiny network with the vocabulary's 8192 image values, for the chat and serving tests: a
# random LLM's image tokens are then all codes this SEED can draw.
CHAT_CONFIG = SeedConfig(**{**TINY, "codebook_size": 8192})


# -- the published layout, written out from SEED's module tree (qformer_quantizer.py, eva_vit.py) -------
def published_shapes(c: SeedConfig):
    """(eva_vit_g.pth shapes, seed_quantizer.pt shapes), with tensors SEED keeps but never reads at
    inference (one ViT block past vit_depth, the recon_s `blocks`/`pos_embed`)."""
    w, h, q = c.vit_width, c.qformer_hidden, c.num_query_tokens
    vit = {"cls_token": (1, 1, w), "pos_embed": (1, 1 + c.num_patches, w),
           "patch_embed.proj.weight": (w, 3, c.patch_size, c.patch_size), "patch_embed.proj.bias": (w,)}
    for i in range(c.vit_depth + 1):
        vit.update({f"blocks.{i}.norm1.weight": (w,), f"blocks.{i}.norm1.bias": (w,),
                    f"blocks.{i}.attn.qkv.weight": (3 * w, w), f"blocks.{i}.attn.q_bias": (w,),
                    f"blocks.{i}.attn.v_bias": (w,), f"blocks.{i}.attn.proj.weight": (w, w),
                    f"blocks.{i}.attn.proj.bias": (w,), f"blocks.{i}.norm2.weight": (w,),
                    f"blocks.{i}.norm2.bias": (w,), f"blocks.{i}.mlp.fc1.weight": (c.vit_mlp_dim, w),
                    f"blocks.{i}.mlp.fc1.bias": (c.vit_mlp_dim,), f"blocks.{i}.mlp.fc2.weight": (w, c.vit_mlp_dim),
                    f"blocks.{i}.mlp.fc2.bias": (w,)})
    quant = {"ln_vision.weight": (w,), "ln_vision.bias": (w,), "query_tokens": (1, q, h),
             "Qformer.bert.embeddings.LayerNorm.weight": (h,), "Qformer.bert.embeddings.LayerNorm.bias": (h,)}

    def linear(prefix, n_out, n_in, bias=True):
        quant[prefix + ".weight"] = (n_out, n_in)
        if bias:
            quant[prefix + ".bias"] = (n_out,)

    def norm(prefix, n):
        quant[prefix + ".weight"], quant[prefix + ".bias"] = (n,), (n,)

    for i in range(c.qformer_layers):
        p = f"Qformer.bert.encoder.layer.{i}"
        for kind, context in (("attention", h), ("crossattention", w)):
            if kind == "crossattention" and i % c.cross_attention_freq:
                continue
            linear(f"{p}.{kind}.self.query", h, h)
            linear(f"{p}.{kind}.self.key", h, context)
            linear(f"{p}.{kind}.self.value", h, context)
            linear(f"{p}.{kind}.output.dense", h, h)
            norm(f"{p}.{kind}.output.LayerNorm", h)
        linear(f"{p}.intermediate_query.dense", c.qformer_intermediate, h)
        linear(f"{p}.output_query.dense", h, c.qformer_intermediate)
        norm(f"{p}.output_query.LayerNorm", h)
    quant["quantize.embedding.weight"] = (c.codebook_size, c.codebook_dim)
    linear("encode_task_layer.0", h, h)
    linear("encode_task_layer.2", c.codebook_dim, h)
    linear("decode_task_layer.0", c.codebook_dim, c.codebook_dim)
    linear("decode_task_layer.2", h, c.codebook_dim)
    for name, depth in (("blocks", 1), ("blocks_image", c.decoder_depth)):
        quant["pos_embed" if name == "blocks" else "pos_embed_image"] = (1, q, h)
        for i in range(depth):
            norm(f"{name}.{i}.norm1", h)
            linear(f"{name}.{i}.attn.qkv", 3 * h, h)
            linear(f"{name}.{i}.attn.proj", h, h)
            norm(f"{name}.{i}.norm2", h)
            linear(f"{name}.{i}.mlp.fc1", c.decoder_mlp_dim, h)
            linear(f"{name}.{i}.mlp.fc2", h, c.decoder_mlp_dim)
    d1, d2, d3 = c.image_down_dims
    linear("image_down.0", d1, h, bias=False)
    linear("image_down.2", d2, d1, bias=False)
    linear("image_down.4", d3, d2, bias=False)
    linear("distill_image_proj", c.image_embed_dim, q * d3)
    return vit, quant


def random_tensors(shapes, generator):
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=generator, dtype=torch.float64)
        if len(shape) >= 2 and name not in ("cls_token", "pos_embed", "query_tokens", "pos_embed_image"):
            t = t * math.prod(shape[1:]) ** -0.5
        elif name.endswith(("norm1.weight", "norm2.weight", "LayerNorm.weight", "ln_vision.weight")):
            t = 1 + 0.1 * t
        else:
            t = 0.3 * t
        out[name] = t.float()
    return out


def picture(height: int, width: int, seed: int, mode: str = "RGB"):
    """A PIL image of random pixels (RGB, or grayscale with mode="L")."""
    import numpy as np
    from PIL import Image

    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def chat_image_tokenizer(tmp_path, seed: int = 0):
    """A random SEED of CHAT_CONFIG on the CPU with the tiny unCLIP pipeline loaded."""
    from anygpt_engine.codecs import SeedImageTokenizer

    tokenizer = SeedImageTokenizer(CHAT_CONFIG, None, device="cpu", seed=seed)
    tokenizer.load_diffusion(tiny_unclip_pipeline(CHAT_CONFIG.image_embed_dim, tmp_path))
    return tokenizer


def save_published(root, config: SeedConfig, seed: int = 0):
    """Random weights of `config` written as AnyGPT publishes SEED (seed_quantizer.pt without the
    ViT, eva_vit_g.pth beside it) into `root`; returns (root, vit tensors, quantizer tensors)."""
    g = torch.Generator().manual_seed(seed)
    vit_shapes, quant_shapes = published_shapes(config)
    vit, quant = random_tensors(vit_shapes, g), random_tensors(quant_shapes, g)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(quant, root / "seed_quantizer.pt")
    torch.save(vit, root / "eva_vit_g.pth")
    return root, vit, quant


def tiny_unclip_pipeline(embed_dim, tmp_path):
    """diffusers' StableUnCLIPImg2ImgPipeline from tiny random components built here (no downloads);
    the tokenizer from a handwritten vocab/merges."""
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "a": 3}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=8)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=1, num_attention_heads=4, projection_dim=32,
                                                max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=1)).eval()
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, projection_dim=embed_dim,
                                                                   num_hidden_layers=1, num_attention_heads=4,
                                                                   image_size=16, intermediate_size=37,
                                                                   patch_size=8)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                                attention_head_dim=(2, 4), class_embed_type="projection",
                                projection_class_embeddings_input_dim=2 * embed_dim, cross_attention_dim=32,
                                layers_per_block=1, upcast_attention=True, use_linear_projection=True).eval()
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1)
    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=ImageProcessor(crop_size=16, size=16), image_encoder=image_encoder,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=embed_dim),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), tokenizer=tokenizer,
        text_encoder=text_encoder, unet=unet, scheduler=scheduler, vae=vae)
