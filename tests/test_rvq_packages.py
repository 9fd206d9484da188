"""The engine's RVQ against the real packages: speechtokenizer's and encodec's
ResidualVectorQuantizer (test-only dependencies, skipped when absent) and transformers'
EncodecModel quantizer, all with random codebooks (kmeans_init=False). Codes must match except
at certified float32 near-ties (see test_rvq.assert_same_or_certified_near_tie), and
reconstructions of matching rows must match bit for bit."""

import importlib
import importlib.util
import sys
import types

import pytest
import torch

from anygpt_engine import codecs, ops
from test_rvq import assert_same_or_certified_near_tie, bits, near_codeword_frames, random_frames


def package_module(package: str, module: str = "quantization.vq"):
    """`{package}.{module}`. Both packages import torchaudio (and more) from their top-level
    __init__, which a CPU torch often cannot load; their quantizers and networks need only torch,
    numpy and einops, so on that failure the submodule is imported under a bare stand-in parent,
    which is removed from sys.modules again afterwards."""
    pytest.importorskip("einops")
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")

    def ours(name):
        return name == package or name.startswith(package + ".")

    before = {k: v for k, v in sys.modules.items() if ours(k)}
    try:
        return importlib.import_module(f"{package}.{module}")
    except (ImportError, OSError):
        pass
    for name in [k for k in sys.modules if ours(k)]:  # leftovers of the failed import
        del sys.modules[name]
    parent = types.ModuleType(package)
    parent.__path__ = list(importlib.util.find_spec(package).submodule_search_locations)
    sys.modules[package] = parent
    try:
        return importlib.import_module(f"{package}.{module}")
    finally:
        for name in [k for k in sys.modules if ours(k)]:
            del sys.modules[name]
        sys.modules.update(before)


def _frames_bdt(codebooks, batch, frames, seed):
    """[B, D, T] encoder-layout input: half random frames, half near level-0 codewords."""
    dim = codebooks.shape[2]
    n = batch * frames
    x = torch.cat([random_frames(n - n // 2, dim, seed=seed), near_codeword_frames(codebooks, n // 2, seed=seed + 1)])
    return x.view(batch, frames, dim).transpose(1, 2).contiguous()


def _check_against(quantizer_encode, quantizer_decode, codebooks, x_bdt):
    """Encode with the reference face (test_rvq holds every face to it, bit for bit)."""
    theirs = quantizer_encode(x_bdt)  # [L, B, T]
    x = x_bdt.transpose(1, 2)
    ours = ops.rvq_encode(x, codebooks)
    assert ours.shape == theirs.shape
    assert_same_or_certified_near_tie(ours, theirs, x, codebooks.embed)
    same = (ours == theirs).all(0)  # [B, T]
    recon_theirs = quantizer_decode(theirs).transpose(1, 2)  # [B, T, D]
    for face in ("torch", "triton"):
        recon_ours = ops.rvq_decode(ours, codebooks, backend=face)
        assert torch.equal(bits(recon_ours[same]), bits(recon_theirs[same]))
    return ours


@torch.no_grad()
def test_speechtokenizer_quantizer():
    vq = package_module("speechtokenizer")
    torch.manual_seed(0)
    quantizer = vq.ResidualVectorQuantizer(dimension=1024, n_q=8, bins=1024, kmeans_init=False).eval()
    codebooks = codecs.speechtokenizer_codebooks(quantizer)  # keys vq.layers.{l}._codebook.embed
    x = _frames_bdt(codebooks.embed, 4, 250, seed=1)
    codes = _check_against(quantizer.encode, quantizer.decode, codebooks, x)
    # SoundStorm's slice: levels 2..8 decoded on their own (speechtokenizer's st=1)
    assert torch.equal(bits(ops.rvq_decode(codes[1:], codebooks, first_level=1)),
                       bits(quantizer.decode(codes[1:], st=1).transpose(1, 2)))


@torch.no_grad()
def test_encodec_quantizer():
    vq = package_module("encodec")
    torch.manual_seed(1)
    quantizer = vq.ResidualVectorQuantizer(dimension=128, n_q=4, bins=2048, kmeans_init=False).eval()
    codebooks = codecs.encodec_codebooks(quantizer)
    x = _frames_bdt(codebooks.embed, 4, 500, seed=3)
    _check_against(lambda t: quantizer.encode(t, 50), quantizer.decode, codebooks, x)


@torch.no_grad()
def test_transformers_encodec_32khz_quantizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.EncodecConfig(sampling_rate=32000, codebook_size=2048, codebook_dim=128, hidden_size=128,
                                        num_filters=4, upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2],
                                        audio_channels=1, num_lstm_layers=1)
    model = transformers.EncodecModel(config).eval()
    torch.manual_seed(2)
    assert len(model.quantizer.layers) == 4
    for layer in model.quantizer.layers:  # zeros until trained: give them kaiming-uniform values
        layer.codebook.embed.copy_((torch.rand(2048, 128) * 2 - 1) * (6.0 / 128) ** 0.5)
    model.save_pretrained(tmp_path)
    codebooks = codecs.encodec_codebooks(tmp_path)  # model.safetensors, quantizer.layers.{l}.codebook.embed
    assert codebooks.embed.shape == (4, 2048, 128)
    x = _frames_bdt(codebooks.embed, 4, 500, seed=5)
    codes = _check_against(model.quantizer.encode, model.quantizer.decode, codebooks, x)
    # AnyGPT's music tokens: frame-major over the 4 levels of one clip
    ids = codecs.music_tokens(codes[:, 0])
    assert torch.equal(codecs.music_codes(ids), codes[:, 0])
