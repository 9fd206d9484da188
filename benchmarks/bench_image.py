"""SEED image tokenizer: encode (preprocessed 224 x 224 images -> 32 codes) and embed (codes ->
the 1024-d unCLIP image embedding) at batch 1 and 32, the engine against the same network in
plain torch in the same run. Random weights in the published shapes (EVA ViT-g 39 blocks,
Q-Former 12 layers, 8192 x 32 codebook, 4 decoder blocks), the same weights for both paths.

  engine:     codecs.SeedImageTokenizer in --dtype (float16 default: AnyGPT's precision):
              attention through F.scaled_dot_product_attention (flash attention on a GPU),
              ln_vision in float32, the argmin (encode) and the codebook lookup (embed) on
              ops.rvq_encode / ops.rvq_decode (exact float32)
  reference:  AnyGPT's arithmetic (seed2 ImageTokenizer, fp16=True: the whole model .half()):
              the same modules with explicit attention (scores, -10000 causal bias, softmax,
              weighted sum; reference=True) and VectorQuantizer2's expanded-form argmin and
              embedding lookup, all in --dtype

Reported: median ms per call and per image (wall clock, synchronized), the speed-up, the fraction
of codes equal to the reference's (half precision moves features, so near-ties flip), the largest
embedding difference relative to the embedding's largest value, GPU name and git sha.
--quick is a CPU smoke run of the harness on a tiny configuration (float32).

    python benchmarks/bench_image.py [--quick] [--batch 1 32] [--dtype float16] [--repeats 10] [--json PATH]
"""

import argparse
import json

import torch
import torch.nn.functional as F

from anygpt_engine import codecs
from anygpt_engine.bench import git_sha, median_wall_ms
from anygpt_engine.models.seed import SeedConfig

TINY = SeedConfig(image_size=56, patch_size=14, vit_width=48, vit_depth=2, vit_heads=4, vit_mlp_dim=100,
                  qformer_hidden=40, qformer_layers=3, qformer_heads=5, qformer_intermediate=72, num_query_tokens=32,
                  codebook_size=300, codebook_dim=12, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=88,
                  image_down_dims=(20, 16, 6), image_embed_dim=32)


@torch.inference_mode()
def reference_encode(net, codebook, pixels):
    """AnyGPT's get_codebook_indices: explicit-attention network, then VectorQuantizer2's argmin of
    ||z||^2 + ||e||^2 - 2 z.e in the weights' dtype."""
    z = net.features(pixels, reference=True)
    flat = z.reshape(-1, z.shape[-1])
    distances = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
    return distances.argmin(1).view(z.shape[0], -1)


@torch.inference_mode()
def reference_embed(net, codebook, codes):
    """AnyGPT's get_codebook_entry: embedding lookup, explicit-attention decoder."""
    return net.embed(F.embedding(codes, codebook), reference=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run on a tiny configuration")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="images per call (default 1 32)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    config = TINY if args.quick else SeedConfig()
    dtype = torch.float32 if args.quick else getattr(torch, args.dtype)
    batches = args.batch or ([1, 4] if args.quick else [1, 32])
    repeats = 2 if args.quick else args.repeats
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sha = git_sha()

    tokenizer = codecs.SeedImageTokenizer(config, None, device=device, dtype=dtype)  # random weights
    net = tokenizer.net
    codebook = tokenizer.codebooks.embed[0].to(dtype)  # AnyGPT's model.half() casts the codebook too
    params = sum(p.numel() for p in net.parameters())
    print(f"# SEED tokenizer  device={name}  dtype={dtype}  params={params / 1e6:.1f}M  git={sha}")
    print(f"{'batch':>5} {'op':>6} {'reference_ms':>12} {'engine_ms':>9} {'engine_ms/img':>13} {'speedup':>8} "
          f"{'agreement':>10}")
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        pixels = torch.randn(batch, 3, config.image_size, config.image_size, generator=g).to(device)
        ref_ms, ref_codes = median_wall_ms(lambda: reference_encode(net, codebook, pixels.to(dtype)), device, repeats)
        eng_ms, codes = median_wall_ms(lambda: tokenizer.encode(pixels), device, repeats)
        equal = (codes == ref_codes).float().mean().item()
        rows.append(dict(batch=batch, op="encode", reference_ms=ref_ms, engine_ms=eng_ms,
                         engine_ms_per_image=eng_ms / batch, speedup=ref_ms / eng_ms, codes_equal_fraction=equal))
        ref_ms, ref_embeds = median_wall_ms(lambda: reference_embed(net, codebook, codes), device, repeats)
        eng_ms, embeds = median_wall_ms(lambda: tokenizer.embed(codes), device, repeats)
        difference = ((embeds - ref_embeds.float()).abs().max() / ref_embeds.float().abs().max()).item()
        rows.append(dict(batch=batch, op="embed", reference_ms=ref_ms, engine_ms=eng_ms,
                         engine_ms_per_image=eng_ms / batch, speedup=ref_ms / eng_ms,
                         embed_max_relative_difference=difference))
        for row in rows[-2:]:
            agreement = (f"{row['codes_equal_fraction']:.3f} eq" if row["op"] == "encode" else
                         f"{row['embed_max_relative_difference']:.1e}")
            print(f"{row['batch']:>5} {row['op']:>6} {row['reference_ms']:>12.2f} {row['engine_ms']:>9.2f} "
                  f"{row['engine_ms_per_image']:>13.3f} {row['speedup']:>7.2f}x {agreement:>10}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=name, git_sha=sha, dtype=str(dtype), quick=args.quick, config=config.to_dict(),
                           rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
