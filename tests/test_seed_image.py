"""codecs.SeedImageTokenizer on a random small SEED saved in the published layout
(seed_quantizer.pt without the ViT + eva_vit_g.pth with one block more than the config reads):
codes equal a float64 reading of the same weights by transformers' BLIP-2 vision model and
Q-Former (causal 4-D mask) except at certified near-ties; the unCLIP embedding equals a float64
reading by transformers' ViT layers; PIL input of odd sizes and modes; batches equal items alone;
the diffusion wiring with diffusers' tiny random components (offline) gives pictures of the
requested size conditioned on our embeddings; clear errors for bad input."""

import dataclasses
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anygpt_engine import codecs
from anygpt_engine.codecs import seed as seed_codec
from anygpt_engine.models.seed import SeedConfig, SeedNet
from image_models import TINY, published_shapes, random_tensors, tiny_unclip_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
C = SeedConfig(**TINY)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(directory with seed_quantizer.pt + eva_vit_g.pth, vit state, quantizer state)."""
    g = torch.Generator().manual_seed(0)
    vit_shapes, quant_shapes = published_shapes(C)
    vit, quant = random_tensors(vit_shapes, g), random_tensors(quant_shapes, g)
    # A trained codebook lies among the features: codewords are features of other images, moved a little.
    features_of, _ = float64_reading(vit, quant, C)
    images = pixels(-(-C.codebook_size // C.num_query_tokens), seed=100).double()
    calibration = features_of(images).reshape(-1, C.codebook_dim)
    pick = torch.randperm(calibration.shape[0], generator=g)[:C.codebook_size]
    quant["quantize.embedding.weight"] = (calibration[pick] + 0.03 * torch.randn(
        C.codebook_size, C.codebook_dim, generator=g, dtype=torch.float64)).float()
    quant["Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]  # a buffer SEED saves, unused
    root = tmp_path_factory.mktemp("seed")
    torch.save(quant, root / "seed_quantizer.pt")
    torch.save(vit, root / "eva_vit_g.pth")
    (root / "config.json").write_text(json.dumps(TINY))
    return root, vit, quant


@pytest.fixture(scope="module")
def tokenizer(published):
    return codecs.SeedImageTokenizer.from_pretrained(published[0], config=published[0] / "config.json", device="cpu")


# -- the float64 readings: transformers' BLIP-2 / ViT modules on the published tensors --------------------
def float64_reading(vit, quant, c: SeedConfig):
    """(features(images64) -> [B, Q, codebook_dim], embed(codes) -> [B, image_embed_dim]), float64."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel, ViTConfig
    from transformers.models.vit.modeling_vit import ViTLayer

    tv = {k: v.double() for k, v in vit.items()}  # separate: both files have pos_embed and blocks.0.*
    t = {k: v.double() for k, v in quant.items()}
    vision = Blip2VisionModel._from_config(Blip2VisionConfig(
        hidden_size=c.vit_width, intermediate_size=c.vit_mlp_dim, num_hidden_layers=c.vit_depth,
        num_attention_heads=c.vit_heads, image_size=c.image_size, patch_size=c.patch_size, layer_norm_eps=1e-6,
        qkv_bias=True, hidden_act="gelu"), attn_implementation="eager").double().eval()
    vision.post_layernorm.eps = 1e-5  # ln_vision's eps; the blocks' is 1e-6
    v = {"embeddings.class_embedding": tv["cls_token"], "embeddings.position_embedding": tv["pos_embed"],
         "embeddings.patch_embedding.weight": tv["patch_embed.proj.weight"],
         "embeddings.patch_embedding.bias": tv["patch_embed.proj.bias"],
         "post_layernorm.weight": t["ln_vision.weight"], "post_layernorm.bias": t["ln_vision.bias"]}
    for i in range(c.vit_depth):
        p, b = f"encoder.layers.{i}", f"blocks.{i}"
        q_bias, v_bias = tv[f"{b}.attn.q_bias"], tv[f"{b}.attn.v_bias"]
        v.update({f"{p}.self_attn.qkv.weight": tv[f"{b}.attn.qkv.weight"],
                  f"{p}.self_attn.qkv.bias": torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]),
                  f"{p}.self_attn.projection.weight": tv[f"{b}.attn.proj.weight"],
                  f"{p}.self_attn.projection.bias": tv[f"{b}.attn.proj.bias"]})
        for ours, theirs in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                             ("mlp.fc2", "mlp.fc2")):
            v[f"{p}.{ours}.weight"], v[f"{p}.{ours}.bias"] = tv[f"{b}.{theirs}.weight"], tv[f"{b}.{theirs}.bias"]
    vision.load_state_dict(v, strict=True)

    qformer = Blip2QFormerModel._from_config(Blip2QFormerConfig(
        hidden_size=c.qformer_hidden, num_hidden_layers=c.qformer_layers, num_attention_heads=c.qformer_heads,
        intermediate_size=c.qformer_intermediate, cross_attention_frequency=c.cross_attention_freq,
        encoder_hidden_size=c.vit_width, layer_norm_eps=1e-12, hidden_act="gelu"),
        attn_implementation="eager").double().eval()
    prefix = "Qformer.bert."
    qs = {"layernorm.weight": t[prefix + "embeddings.LayerNorm.weight"],
          "layernorm.bias": t[prefix + "embeddings.LayerNorm.bias"]}
    for key, value in t.items():
        if key.startswith(prefix + "encoder."):
            qs[key[len(prefix):].replace(".self.", ".attention.")] = value
    qformer.load_state_dict(qs, strict=True)

    def features(images64):
        with torch.no_grad():
            image_tokens = vision(pixel_values=images64).last_hidden_state
            b, q = images64.shape[0], c.num_query_tokens
            causal = torch.triu(torch.full((q, q), -10000.0, dtype=torch.float64), 1)  # SEED's additive mask
            out = qformer(query_embeds=t["query_tokens"].expand(b, -1, -1), attention_mask=causal.expand(b, 1, q, q),
                          encoder_hidden_states=image_tokens).last_hidden_state
            hidden = torch.tanh(F.linear(out, t["encode_task_layer.0.weight"], t["encode_task_layer.0.bias"]))
            return F.linear(hidden, t["encode_task_layer.2.weight"], t["encode_task_layer.2.bias"])

    layers = []
    h = c.qformer_hidden
    for i in range(c.decoder_depth):
        layer = ViTLayer(ViTConfig(hidden_size=h, num_attention_heads=c.decoder_heads,
                                   intermediate_size=c.decoder_mlp_dim, layer_norm_eps=1e-6, hidden_act="gelu",
                                   qkv_bias=True)).double().eval()
        b = f"blocks_image.{i}"
        qkv_w, qkv_b = t[f"{b}.attn.qkv.weight"], t[f"{b}.attn.qkv.bias"]
        s = {}
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(j * h, (j + 1) * h)
            s[f"attention.{name}.weight"], s[f"attention.{name}.bias"] = qkv_w[rows], qkv_b[rows]
        for ours, theirs in (("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"),
                             ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            s[f"{ours}.weight"], s[f"{ours}.bias"] = t[f"{b}.{theirs}.weight"], t[f"{b}.{theirs}.bias"]
        layer.load_state_dict(s, strict=True)
        layers.append(layer)

    def embed(codes):
        with torch.no_grad():
            x = t["quantize.embedding.weight"][codes]
            x = torch.tanh(F.linear(x, t["decode_task_layer.0.weight"], t["decode_task_layer.0.bias"]))
            x = F.linear(x, t["decode_task_layer.2.weight"], t["decode_task_layer.2.bias"]) + t["pos_embed_image"]
            for layer in layers:
                out = layer(x)
                x = out[0] if isinstance(out, tuple) else out
            x = F.linear(F.relu(F.linear(F.relu(F.linear(x, t["image_down.0.weight"])), t["image_down.2.weight"])),
                         t["image_down.4.weight"])
            return F.linear(x.flatten(1), t["distill_image_proj.weight"], t["distill_image_proj.bias"])

    return features, embed


@pytest.fixture(scope="module")
def reading(published):
    return float64_reading(published[1], published[2], C)


def pixels(batch, seed):
    """Preprocessed-looking images: CLIP-normalised smooth patterns plus noise (never all zeros)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, C.image_size), torch.linspace(-1, 1, C.image_size), indexing="ij")
    freq = 1 + 3 * torch.rand(batch, 3, 1, 1, generator=g)
    return torch.sin(freq * (x + 2 * y)) + 0.5 * torch.randn(batch, 3, C.image_size, C.image_size, generator=g)


def assert_codes_certified(ours, features32, features64, codebook, max_fraction=0.02):
    """ours (exact argmin on float32 features) may differ from the float64 argmin only where the
    float32 network error delta = |f32 - f64| can swap two codewords: with s = ||f64 - e||^2,
    |(||f32 - e||^2 - s)| <= delta (2 sqrt(s) + delta), plus the RVQ contract's float32 score rounding."""
    cb = codebook.double()
    f64 = features64.reshape(-1, cb.shape[1])
    dist = torch.cdist(f64, cb).square()  # [N, K]
    theirs = dist.argmin(1)
    ours = ours.reshape(-1)
    differing = (ours != theirs).nonzero()[:, 0].tolist()
    assert len(differing) <= max_fraction * ours.numel(), f"{len(differing)} of {ours.numel()} codes differ"
    delta = (features32.reshape(f64.shape).double() - f64).norm(dim=1)
    emax = cb.norm(dim=1).max().item()
    for n in differing:
        s_ours, s_theirs = dist[n, ours[n]].item(), dist[n, theirs[n]].item()
        d = delta[n].item()
        bound = d * (2 * math.sqrt(s_ours) + d) + d * (2 * math.sqrt(s_theirs) + d)
        bound += 1e-6 * (f64[n].norm().item() + emax) ** 2
        assert s_ours - s_theirs <= bound, (n, s_ours - s_theirs, bound)
    return theirs.reshape(features64.shape[:2])


# -- tests ------------------------------------------------------------------------------------------------
def test_codes_equal_a_float64_reading(tokenizer, reading, published):
    features64_of, _ = reading
    images = pixels(6, seed=1)
    codes = tokenizer.encode(images)
    assert codes.dtype == torch.int64 and codes.shape == (6, 32)
    features32 = tokenizer.features(images)
    features64 = features64_of(images.double())
    assert torch.allclose(features32.double(), features64, atol=1e-4), (features32.double() - features64).abs().max()
    theirs = assert_codes_certified(codes, features32, features64, published[2]["quantize.embedding.weight"])
    assert theirs.unique().numel() > 40  # the codes spread over the codebook: the comparison means something
    # In float64 both attention paths (SDPA; the plain-torch reference, the benchmarks' baseline)
    # are the same network as transformers' reading.
    tok64 = codecs.SeedImageTokenizer.from_pretrained(published[0], config=C, device="cpu", dtype=torch.float64)
    with torch.no_grad():
        for reference in (False, True):
            torch.testing.assert_close(tok64.net.features(images.double(), reference=reference), features64,
                                       atol=1e-12, rtol=1e-10)


def test_embedding_equals_a_float64_reading(tokenizer, reading):
    _, embed64 = reading
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, C.codebook_size, (5, 32), generator=g)
    codes[0, :3] = torch.tensor([0, C.codebook_size - 1, 7])
    ours = tokenizer.embed(codes)
    theirs = embed64(codes)
    assert ours.dtype == torch.float32 and ours.shape == (5, C.image_embed_dim)
    scale = theirs.abs().max().item()
    assert scale > 0.1
    torch.testing.assert_close(ours.double(), theirs, atol=2e-6 * scale, rtol=1e-5)
    other = codes.clone()
    other[:, 5] = (other[:, 5] + 1) % C.codebook_size
    assert (tokenizer.embed(other) - ours).abs().amax(1).min() > 1e-3  # every code matters
    assert torch.equal(tokenizer.embed(codes[2]), tokenizer.embed(codes[2:3]))  # [Q] is one image
    assert torch.equal(tokenizer.embed(codes[3].numpy()), tokenizer.embed(codes[3].tolist()))


def test_pil_images_of_odd_sizes_and_modes(tokenizer):
    from PIL import Image

    g = np.random.default_rng(3)
    arrays = [g.integers(0, 256, size, dtype=np.uint8) for size in ((31, 57, 3), (200, 301, 3), (56, 56, 3))]
    images = [Image.fromarray(a) for a in arrays]
    images.append(Image.fromarray(g.integers(0, 256, (45, 23), dtype=np.uint8)))  # grayscale "L"
    images.append(Image.fromarray(g.integers(0, 256, (64, 40, 4), dtype=np.uint8)))  # "RGBA"
    # AnyGPT's processor: RGB, PIL bicubic resize to S x S (no crop), /255 in float32, CLIP normalisation
    mean, std = np.array(seed_codec.CLIP_MEAN, np.float32), np.array(seed_codec.CLIP_STD, np.float32)
    expected = np.stack([((np.asarray(im.convert("RGB").resize((56, 56), Image.BICUBIC), np.float32) / np.float32(255)
                           - mean) / std).transpose(2, 0, 1) for im in images])
    got = tokenizer.preprocess(images)
    assert got.dtype == torch.float32 and got.shape == (5, 3, 56, 56)
    assert torch.equal(got, torch.from_numpy(expected))
    codes = tokenizer.encode(images)
    assert torch.equal(codes, tokenizer.encode(torch.from_numpy(expected)))
    assert torch.equal(tokenizer.encode(images[1]), codes[1:2])  # one PIL image -> [1, 32]


def test_batches_equal_items_alone(tokenizer):
    images = pixels(7, seed=4)
    codes = tokenizer.encode(images)
    embeds = tokenizer.embed(codes)
    for i in (0, 3, 6):
        assert torch.equal(tokenizer.encode(images[i:i + 1]), codes[i:i + 1])
        torch.testing.assert_close(tokenizer.embed(codes[i]), embeds[i:i + 1], atol=1e-6, rtol=1e-6)
    # and an item's codes do not depend on its neighbours
    shuffled = tokenizer.encode(torch.cat([images[4:], images[:4]]))
    assert torch.equal(shuffled, torch.cat([codes[4:], codes[:4]]))


def test_published_layout_loading(published, tokenizer):
    root, vit, quant = published
    images = pixels(2, seed=5)
    expected = tokenizer.encode(images)
    # file path + explicit vit_path, config as a dict
    other = codecs.SeedImageTokenizer.from_pretrained(root / "seed_quantizer.pt", vit_path=root / "eva_vit_g.pth",
                                                      config=TINY, device="cpu")
    assert torch.equal(other.encode(images), expected)
    # the ViT inside seed_quantizer.pt (visual_encoder.*) needs no eva_vit_g.pth
    merged = {**quant, **{"visual_encoder." + k: v for k, v in vit.items()}}
    solo = codecs.SeedImageTokenizer(C, merged, None, device="cpu")
    assert torch.equal(solo.encode(images), expected)
    # the ViT file's extra block is not read: changing it changes nothing; changing a used one does
    vit_changed = dict(vit)
    vit_changed[f"blocks.{C.vit_depth}.mlp.fc1.weight"] = torch.zeros_like(vit[f"blocks.{C.vit_depth}.mlp.fc1.weight"])
    assert torch.equal(codecs.SeedImageTokenizer(C, quant, vit_changed, device="cpu").encode(images), expected)
    vit_changed["blocks.0.attn.q_bias"] = vit["blocks.0.attn.q_bias"] + 1.0
    assert not torch.equal(codecs.SeedImageTokenizer(C, quant, vit_changed, device="cpu").features(images),
                           tokenizer.features(images))


def test_published_sizes_are_the_default():
    c = SeedConfig()
    assert (c.image_size, c.patch_size, c.vit_width, c.vit_depth, c.vit_heads, c.vit_mlp_dim) == (224, 14, 1408, 39,
                                                                                                   16, 6144)
    assert (c.qformer_hidden, c.qformer_layers, c.qformer_heads, c.qformer_intermediate, c.cross_attention_freq,
            c.num_query_tokens) == (768, 12, 12, 3072, 2, 32)
    assert (c.codebook_size, c.codebook_dim, c.decoder_depth, c.decoder_heads, c.image_embed_dim) == (8192, 32, 4, 12,
                                                                                                      1024)
    with torch.device("meta"):
        net = SeedNet(c)
    shapes = {name: tuple(p.shape) for name, p in net.named_parameters()}
    vit_shapes, quant_shapes = published_shapes(c)
    from anygpt_engine.models.seed import checkpoint_key

    for name, shape in shapes.items():
        source, key = checkpoint_key(name)
        assert (vit_shapes if source == "vit" else quant_shapes)[key] == shape, name
    read = {checkpoint_key(name) for name in shapes}
    assert {k for k in vit_shapes if ("vit", k) not in read} == {k for k in vit_shapes if k.startswith("blocks.39.")}
    assert {k for k in quant_shapes if ("quantizer", k) not in read} == {
        k for k in quant_shapes if k.startswith("blocks.0.") or k in ("pos_embed", "quantize.embedding.weight")}


def test_bad_input_names_the_argument(tokenizer, published):
    root, vit, quant = published
    with pytest.raises(ValueError, match=r"images.shape=\(2, 4, 56, 56\)"):
        tokenizer.encode(torch.zeros(2, 4, 56, 56))
    with pytest.raises(ValueError, match=r"images.shape=\(0, 3, 56, 56\) is an empty batch"):
        tokenizer.encode(torch.zeros(0, 3, 56, 56))
    with pytest.raises(ValueError, match="images is an empty list"):
        tokenizer.encode([])
    with pytest.raises(ValueError, match=r"images.shape=\(1, 3, 57, 56\)"):
        tokenizer.encode(torch.zeros(1, 3, 57, 56))
    with pytest.raises(TypeError, match="images.dtype=torch.uint8"):
        tokenizer.encode(torch.zeros(1, 3, 56, 56, dtype=torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        tokenizer.encode(torch.full((1, 3, 56, 56), float("nan")))
    with pytest.raises(TypeError, match=r"images\[1\] is a str"):
        from PIL import Image

        tokenizer.encode([Image.new("RGB", (9, 9), (10, 20, 30)), "cat.jpg"])
    codes = torch.zeros(2, 32, dtype=torch.int64)
    codes[1, 7] = C.codebook_size
    with pytest.raises(ValueError, match=rf"codes\[1, 7\]={C.codebook_size} is out of range"):
        tokenizer.embed(codes)
    with pytest.raises(ValueError, match=r"codes\[0, 0\]=-1 is out of range"):
        tokenizer.embed(torch.full((1, 32), -1))
    with pytest.raises(ValueError, match=r"codes.shape=\(2, 31\)"):
        tokenizer.embed(torch.zeros(2, 31, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"codes.shape=\(0, 32\) is an empty batch"):
        tokenizer.embed(torch.zeros(0, 32, dtype=torch.int64))
    with pytest.raises(TypeError, match="codes.dtype=torch.float32"):
        tokenizer.embed(torch.zeros(1, 32))
    with pytest.raises(RuntimeError, match="load_diffusion"):
        tokenizer.decode(torch.zeros(1, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"unknown fields \['vit_widht'\]"):
        SeedConfig.from_any({"vit_widht": 8})
    with pytest.raises(ValueError, match="vit_width=50 is not a multiple of vit_heads=4"):
        dataclasses.replace(C, vit_width=50)
    broken = dict(quant)
    del broken["Qformer.bert.encoder.layer.2.crossattention.self.key.weight"]
    broken["decode_task_layer.2.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"missing 1 \(Qformer.bert.encoder.layer.2.crossattention.self.key.weight "
                                         r"\(seed_quantizer.pt\)\); wrong shape 1 \(decode_task_layer.2.weight"):
        codecs.SeedImageTokenizer(C, broken, vit, device="cpu")
    with pytest.raises(ValueError, match=r"missing 13 \(blocks.0.norm1.weight \(the ViT file"):
        codecs.SeedImageTokenizer(C, quant, {k: v for k, v in vit.items() if not k.startswith("blocks.0.")},
                                  device="cpu")
    with pytest.raises(ValueError, match="codebook .* does not match the config"):
        codecs.SeedImageTokenizer(dataclasses.replace(C, codebook_size=299), quant, vit, device="cpu")
    with pytest.raises(FileNotFoundError, match="pass vit_path="):
        lonely = root.parent / "lonely"
        lonely.mkdir(exist_ok=True)
        torch.save(quant, lonely / "seed_quantizer.pt")
        codecs.SeedImageTokenizer.from_pretrained(lonely, config=C)


# -- image out ----------------------------------------------------------------------------------------------
def test_decode_draws_pictures_from_our_embeddings(published, tmp_path):
    tokenizer = codecs.SeedImageTokenizer.from_pretrained(published[0], config=C, device="cpu")
    tokenizer.load_diffusion(tiny_unclip_pipeline(C.image_embed_dim, tmp_path))
    seen = []
    tokenizer.diffusion.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["class_labels"].clone()), with_kwargs=True)
    g = torch.Generator().manual_seed(6)
    codes = torch.randint(0, C.codebook_size, (2, 32), generator=g)
    negative = torch.randint(0, C.codebook_size, (2, 32), generator=g)

    pictures = tokenizer.decode(codes, num_inference_steps=2, seed=3, height=24, width=40)
    assert len(pictures) == 2 and all(p.size == (40, 24) and p.mode == "RGB" for p in pictures)
    assert np.asarray(pictures[0]).std() > 0
    # the UNet is conditioned on [unconditional; ours]: zeros, then our embeddings noised at level 0
    labels = seen[0]
    e = C.image_embed_dim
    assert labels.shape == (4, 2 * e)
    noise_scale = (1 - tokenizer.diffusion.image_noising_scheduler.alphas_cumprod[0]).sqrt().item()
    assert torch.equal(labels[:2], torch.zeros_like(labels[:2]))
    torch.testing.assert_close(labels[2:, :e], tokenizer.embed(codes), atol=6 * noise_scale, rtol=0)
    # a seed reproduces a picture, and an item's picture is its own whatever the batch
    again = tokenizer.decode(codes, num_inference_steps=2, seed=3, height=24, width=40)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pictures, again))
    alone = tokenizer.decode(codes[1], num_inference_steps=2, seed=4, height=24, width=40)[0]
    assert np.abs(np.asarray(alone, np.int16) - np.asarray(pictures[1], np.int16)).max() <= 1

    seen.clear()
    steered = tokenizer.decode(codes, negative_codes=negative, num_inference_steps=2, seed=3, height=24, width=40)
    labels = seen[0]
    torch.testing.assert_close(labels[:2, :e], tokenizer.embed(negative), atol=6 * noise_scale, rtol=0)
    torch.testing.assert_close(labels[:2, e:], labels[2:, e:])  # the same noise-level embedding
    assert not np.array_equal(np.asarray(steered[0]), np.asarray(pictures[0]))

    with pytest.raises(ValueError, match=r"negative_codes.shape=\(1, 32\), expected \(2, 32\)"):
        tokenizer.decode(codes, negative_codes=negative[:1])
    with pytest.raises(ValueError, match="guidance_scale=-1"):
        tokenizer.decode(codes, guidance_scale=-1)
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        tokenizer.decode(codes, num_inference_steps=0)
    with pytest.raises(ValueError, match="height=4, expected an int >= 8"):
        tokenizer.decode(codes, height=4)
    with pytest.raises(ValueError, match="seed=-1"):
        tokenizer.decode(codes, seed=-1)
    with pytest.raises(ValueError, match=rf"codes\[0, 0\]={C.codebook_size} is out of range"):
        tokenizer.decode(torch.full((1, 32), C.codebook_size))
    with pytest.raises(ValueError, match="takes 16-d image embeddings"):
        codecs.SeedImageTokenizer.from_pretrained(published[0], config=C, device="cpu").load_diffusion(
            tiny_unclip_pipeline(16, tmp_path))


def test_decode_without_diffusers_says_what_to_install(tokenizer, monkeypatch):
    seed_codec._unclip_pipeline_class.cache_clear()
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    try:
        with pytest.raises(ImportError, match=r"pip install 'anygpt-engine\[image\]'"):
            tokenizer.load_diffusion("/nonexistent")
    finally:
        seed_codec._unclip_pipeline_class.cache_clear()


def test_benchmark_quick_run(tmp_path, monkeypatch):
    """benchmarks/bench_image.py --quick: both paths run on the same tiny network and agree."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_image.py"
    spec = importlib.util.spec_from_file_location("bench_image", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["bench_image.py", "--quick", "--json", str(tmp_path / "out.json")])
    bench.main()
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [(r["batch"], r["op"]) for r in rows] == [(1, "encode"), (1, "embed"), (4, "encode"), (4, "embed")]
    assert all(r["engine_ms"] > 0 and r["reference_ms"] > 0 for r in rows)
    assert min(r["codes_equal_fraction"] for r in rows if r["op"] == "encode") >= 0.95
    assert max(r["embed_max_relative_difference"] for r in rows if r["op"] == "embed") < 1e-5


@pytest.mark.gpu
def test_cuda_half_precision_agrees_with_float32(published, tokenizer):
    """On CUDA the default dtype is float16 (AnyGPT's): flash attention, exact argmin on the
    float16 network's features. Codes move only where float16 moves the features past a tie."""
    gpu = codecs.SeedImageTokenizer.from_pretrained(published[0], config=C, device="cuda")
    assert gpu.dtype == torch.float16
    images = pixels(8, seed=7)
    codes = gpu.encode(images.cuda()).cpu()
    assert (codes == tokenizer.encode(images)).float().mean() >= 0.9
    embeds = gpu.embed(codes.cuda()).cpu()
    expected = tokenizer.embed(codes)
    assert ((embeds - expected).abs().max() / expected.abs().max()).item() < 2e-2
