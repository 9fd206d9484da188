"""codecs.SpeechTokenizer against the `speechtokenizer` package's own model on the same random
weights (a narrow network with the real strides, hop 320, BiLSTM encoder, 8 RVQ levels):
identical codes (up to certified float32 near-ties, test_rvq's rule), decoded wav within float32
tolerance, odd lengths, batches equal to items alone, and clear errors for bad input."""

import dataclasses
import json

import pytest
import torch

from anygpt_engine import codecs
from anygpt_engine.codecs.audio import resample
from anygpt_engine.models.speechtokenizer import SpeechTokenizerConfig
from test_rvq import assert_same_or_certified_near_tie
from test_rvq_packages import package_module

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = dict(n_filters=4, dimension=32, semantic_dimension=16, strides=[8, 5, 4, 2], lstm_layers=2,
              bidirectional=True, dilation_base=2, residual_kernel_size=3, n_residual_layers=1, activation="ELU",
              sample_rate=16000, n_q=8, codebook_size=64, learning_rate=1e-4)  # a training key, ignored


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(upstream model, config path, checkpoint path), the checkpoint in the published format."""
    model_module = package_module("speechtokenizer", "model")
    torch.manual_seed(0)
    upstream = model_module.SpeechTokenizer(CONFIG).eval()
    with torch.no_grad():
        for layer in upstream.quantizer.vq.layers:  # kmeans_init leaves zeros: spread codewords like frames
            layer._codebook.embed.normal_(0.0, 0.05)
            layer._codebook.inited.fill_(1)
    root = tmp_path_factory.mktemp("speechtokenizer")
    (root / "config.json").write_text(json.dumps(CONFIG))
    torch.save(upstream.state_dict(), root / "SpeechTokenizer.pt")
    return upstream, root / "config.json", root / "SpeechTokenizer.pt"


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    _, config, ckpt = checkpoint
    return codecs.SpeechTokenizer.from_pretrained(config, ckpt, device="cpu")


def speech_like(samples: int, seed: int, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16000
    tone = torch.sin(2 * torch.pi * (120 + 80 * torch.rand(batch, 1, generator=g)) * t)
    return 0.3 * tone + 0.05 * torch.randn(batch, samples, generator=g)


def assert_codes_match_upstream(ours, upstream, wav_bs, tokenizer):
    with torch.no_grad():
        theirs = upstream.encode(wav_bs.unsqueeze(1))  # [L, B, T]
        frames = upstream.encoder(wav_bs.unsqueeze(1)).transpose(1, 2)  # what both quantize
    assert ours.shape == theirs.permute(1, 0, 2).shape
    assert_same_or_certified_near_tie(ours.permute(1, 0, 2), theirs, frames, tokenizer.codebooks.embed)


@pytest.mark.parametrize("samples", [320, 16001, 1, 4000])
def test_codes_equal_the_package(checkpoint, tokenizer, samples):
    upstream = checkpoint[0]
    wav = speech_like(samples, seed=samples, batch=2)
    codes = tokenizer.encode(wav, 16000)
    assert codes.dtype == torch.int64 and codes.shape == (2, 8, -(-samples // 320))
    assert_codes_match_upstream(codes, upstream, wav, tokenizer)


def test_decode_is_close_to_the_package(checkpoint, tokenizer):
    upstream = checkpoint[0]
    codes = tokenizer.encode(speech_like(16001, seed=3, batch=2), 16000)
    for levels in (8, 1, 3):
        ours = tokenizer.decode(codes[:, :levels])
        with torch.no_grad():
            theirs = upstream.decode(codes[:, :levels].permute(1, 0, 2)).squeeze(1)
        assert ours.shape == theirs.shape == (2, 51 * 320)
        scale = theirs.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(ours, theirs, atol=1e-5 * scale, rtol=1e-4)


def test_level_one_alone_and_resampled_input(checkpoint, tokenizer):
    wav44 = speech_like(44100, seed=7)[0]
    all_levels = tokenizer.encode(wav44, 44100)
    assert torch.equal(tokenizer.encode(wav44, 44100, levels=1), all_levels[:, :1])
    assert all_levels.shape == (1, 8, 50)
    # the 44.1 kHz input goes through codecs.audio.resample (== scipy's resample_poly)
    assert_codes_match_upstream(all_levels, checkpoint[0], resample(wav44, 44100, 16000)[None], tokenizer)


def test_channels_and_batches_give_what_items_give_alone(tokenizer):
    a, b = speech_like(9600, seed=1)[0], speech_like(9600, seed=2)[0]
    batch = tokenizer.encode(torch.stack([a, b]), 16000)
    assert torch.equal(batch[0], tokenizer.encode(a, 16000)[0])
    assert torch.equal(batch[1], tokenizer.encode(b, 16000)[0])
    stereo = torch.stack([a, b])[None]  # [1, 2, S] -> the channel mean
    assert torch.equal(tokenizer.encode(stereo, 16000), tokenizer.encode((a + b) / 2, 16000))
    short = speech_like(3333, seed=4)[0]
    ragged = tokenizer.encode([a, short], 16000, levels=2)
    assert [tuple(c.shape) for c in ragged] == [(2, 30), (2, 11)]
    assert torch.equal(ragged[1], tokenizer.encode(short, 16000, levels=2)[0])
    wavs = tokenizer.decode(ragged)
    assert [w.shape[0] for w in wavs] == [9600, 3520]
    assert torch.equal(wavs[1], tokenizer.decode(ragged[1][None])[0])


def test_both_weight_norm_spellings_load(checkpoint, tokenizer):
    upstream, config, _ = checkpoint
    renamed = {}
    for key, value in upstream.state_dict().items():
        key = key.replace("weight_g", "parametrizations.weight.original0").replace(
            "weight_v", "parametrizations.weight.original1")
        renamed[key] = value
    other = codecs.SpeechTokenizer(SpeechTokenizerConfig.from_json(config), renamed, device="cpu")
    wav = speech_like(1000, seed=9)
    assert torch.equal(other.encode(wav, 16000), tokenizer.encode(wav, 16000))


def test_bad_input_names_the_argument(checkpoint, tokenizer):
    upstream, config, ckpt = checkpoint
    with pytest.raises(ValueError, match="wav.shape"):
        tokenizer.encode(torch.zeros(1, 0), 16000)
    with pytest.raises(ValueError, match="NaN"):
        tokenizer.encode(torch.tensor([0.1, float("nan"), 0.2]), 16000)
    with pytest.raises(ValueError, match="wav.shape"):
        tokenizer.encode(torch.zeros(1, 1, 1, 5), 16000)
    with pytest.raises(ValueError, match="levels=9"):
        tokenizer.encode(torch.ones(400) * 0.1, 16000, levels=9)
    with pytest.raises(ValueError, match="sample_rate=-1"):
        tokenizer.encode(torch.ones(400) * 0.1, -1)
    with pytest.raises(ValueError, match=r"wav\[1\].shape"):
        tokenizer.encode([torch.ones(400) * 0.1, torch.ones(1, 2, 400)], 16000)
    with pytest.raises(ValueError, match=r"codes\[0, 1, 2\]=64 is out of range"):
        codes = torch.zeros(1, 2, 3, dtype=torch.int64)
        codes[0, 1, 2] = 64
        tokenizer.decode(codes)
    with pytest.raises(ValueError, match="codes.shape"):
        tokenizer.decode(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="9 levels"):
        tokenizer.decode(torch.zeros(1, 9, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="codes.dtype"):
        tokenizer.decode(torch.zeros(1, 2, 3))
    state = dict(upstream.state_dict())
    del state["decoder.model.0.conv.conv.bias"]
    state["encoder.model.99.conv.conv.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"missing 1 \(decoder.0.bias\); unexpected 1 \(encoder.model.99"):
        codecs.SpeechTokenizer(SpeechTokenizerConfig.from_json(config), state, device="cpu")
    with pytest.raises(ValueError, match="do not match the config"):
        codecs.SpeechTokenizer(dataclasses.replace(SpeechTokenizerConfig.from_json(config), codebook_size=32),
                               upstream.state_dict(), device="cpu")
    with pytest.raises(FileNotFoundError):
        codecs.SpeechTokenizer.from_pretrained(ckpt.parent / "nope.json", ckpt)
