"""Waveform helpers: the torch polyphase resampler against scipy.signal.resample_poly (its
oracle, same filter), shape/channel handling and wav round trips."""

import numpy as np
import pytest
import torch

from anygpt_engine.codecs.audio import as_batch, read_wav, resample, write_wav


@pytest.mark.parametrize("orig,new,n", [(44100, 16000, 44101), (24000, 16000, 16001), (16000, 24000, 7),
                                        (16000, 32000, 1), (48000, 16000, 1000), (22050, 32000, 129)])
def test_resample_equals_scipy_resample_poly(orig, new, n):
    signal = pytest.importorskip("scipy.signal")
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    ours = resample(x.float(), orig, new)
    theirs = signal.resample_poly(x.numpy(), new, orig, axis=-1)
    assert ours.shape == theirs.shape == (3, -(-n * new // orig))
    np.testing.assert_allclose(ours.numpy(), theirs, atol=2e-6, rtol=0)


def test_resample_keeps_a_tone_and_leading_dims():
    t = torch.arange(44100) / 44100
    tone = torch.sin(2 * torch.pi * 440 * t).expand(2, 1, -1)
    out = resample(tone, 44100, 16000)
    assert out.shape == (2, 1, 16000)
    expected = torch.sin(2 * torch.pi * 440 * torch.arange(16000) / 16000)
    assert (out[0, 0, 400:-400] - expected[400:-400]).abs().max() < 1e-3  # edges see the zero padding
    assert resample(tone, 16000, 16000) is tone


def test_as_batch_shapes_and_errors():
    assert as_batch("wav", torch.ones(5)).shape == (1, 5)
    stereo = torch.stack([torch.ones(2, 4), -torch.ones(2, 4) * 3], dim=1)  # [B=2, C=2, 4]
    assert torch.equal(as_batch("wav", stereo), -torch.ones(2, 4))
    with pytest.raises(ValueError, match="wav.shape"):
        as_batch("wav", torch.ones(1, 1, 1, 3))
    with pytest.raises(ValueError, match="wav.shape"):
        as_batch("wav", torch.ones(1, 0))
    with pytest.raises(ValueError, match="NaN"):
        as_batch("wav", torch.tensor([0.0, float("nan")]))
    with pytest.raises(TypeError, match="wav.dtype"):
        as_batch("wav", torch.ones(3, dtype=torch.int16))
    with pytest.raises(ValueError, match="orig_rate"):
        resample(torch.ones(3), 0, 16000)


def test_wav_round_trip(tmp_path):
    pytest.importorskip("soundfile")
    wav = torch.sin(torch.arange(1601) * 0.05) * 0.5
    write_wav(tmp_path / "a.wav", wav, 16000)
    back, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and back.shape == (1, 1601)
    assert (back[0] - wav).abs().max() <= 1 / 32767  # 16-bit PCM
