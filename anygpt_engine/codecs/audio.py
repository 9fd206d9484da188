"""Waveforms in and out of the codecs: shape checks, channel mixing, polyphase resampling and
wav files. No torchaudio (it has no build for the torch this project pins).

Resampling is polyphase FIR filtering with the filter scipy.signal.resample_poly designs by
default (a Kaiser-windowed sinc, beta 5, 10 zero crossings per side of the wider rate, cutoff at
the lower Nyquist frequency), computed in torch so it runs on the wav's device. Its output
equals scipy's to float32 rounding (tests/test_audio.py holds it to that), so code that
resampled with scipy before it reaches the codec sees the same samples.
"""

from __future__ import annotations

import os
from fractions import Fraction

import torch


def as_batch(name: str, wav, *, min_samples: int = 1) -> torch.Tensor:
    """A wav as float32 [B, samples]: [samples] gives B = 1; [B, C, samples] is mixed to mono by
    the channel mean. Rejects empty, non-finite and non-float input with the argument's name."""
    if not isinstance(wav, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of samples, got {type(wav).__name__}")
    if not wav.dtype.is_floating_point:
        raise TypeError(f"{name}.dtype={wav.dtype}, expected floating-point samples in [-1, 1]")
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    elif wav.dim() == 3:
        if wav.shape[1] == 0:
            raise ValueError(f"{name}.shape={tuple(wav.shape)} has no channels")
        wav = wav.float().mean(dim=1)
    elif wav.dim() != 2:
        raise ValueError(f"{name}.shape={tuple(wav.shape)}, expected [samples], [B, samples] or [B, C, samples]")
    if wav.shape[0] == 0 or wav.shape[-1] < min_samples:
        raise ValueError(f"{name}.shape={tuple(wav.shape)}, expected at least one item of >= {min_samples} samples")
    wav = wav.float()
    if not bool(torch.isfinite(wav).all()):
        raise ValueError(f"{name} holds NaN or infinite samples")
    return wav


def _check_rate(name: str, rate) -> int:
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise ValueError(f"{name}={rate!r}, expected a positive int (Hz)")
    return rate


def _lowpass(up: int, down: int, device) -> torch.Tensor:
    """scipy.signal.resample_poly's default filter, times `up` (float64)."""
    wider = max(up, down)
    half = 10 * wider
    n = torch.arange(2 * half + 1, dtype=torch.float64, device=device) - half
    window = torch.kaiser_window(2 * half + 1, periodic=False, beta=5.0, dtype=torch.float64, device=device)
    h = torch.sinc(n / wider) * window
    return h * (up / h.sum())


def resample(wav: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Resamples the last axis of `wav` from orig_rate to new_rate (Hz): ceil(n * new / orig)
    samples, zeros assumed outside the signal, as scipy.signal.resample_poly(padtype='constant')."""
    orig_rate, new_rate = _check_rate("orig_rate", orig_rate), _check_rate("new_rate", new_rate)
    if orig_rate == new_rate:
        return wav
    ratio = Fraction(new_rate, orig_rate)
    up, down = ratio.numerator, ratio.denominator
    h = _lowpass(up, down, wav.device)
    half = (h.numel() - 1) // 2
    n_in = wav.shape[-1]
    n_out = -(-n_in * up // down)
    taps = -(-h.numel() // up)
    h = torch.nn.functional.pad(h, (0, taps * up - h.numel()))
    # Output n sits at n*down in the up-sampled signal; the filter centred there touches input
    # samples last - t (t < taps) with coefficients h[phase + t*up].
    centre = torch.arange(n_out, device=wav.device) * down + half
    last, phase = centre // up, centre % up
    t = torch.arange(taps, device=wav.device)
    index = last[:, None] - t  # [n_out, taps]; out of range -> zero padding
    coeff = h[phase[:, None] + t * up].to(torch.float32)
    flat = wav.reshape(-1, n_in).float()
    padded = torch.nn.functional.pad(flat, (taps, taps))
    out = torch.empty(flat.shape[0], n_out, device=wav.device)
    rows = max(1, (1 << 24) // (taps * max(1, flat.shape[0])))  # bound the gathered window's memory
    for start in range(0, n_out, rows):
        idx = index[start:start + rows] + taps
        out[:, start:start + rows] = (padded[:, idx] * coeff[start:start + rows]).sum(-1)
    return out.reshape(*wav.shape[:-1], n_out)


def read_wav(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """float32 [channels, samples] in [-1, 1] and the sample rate, from any file soundfile reads."""
    import soundfile

    data, rate = soundfile.read(os.fspath(path), dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()), int(rate)


def write_wav(path: str | os.PathLike, wav: torch.Tensor, sample_rate: int) -> None:
    """Writes [samples] or [channels, samples] float samples as 16-bit PCM (clipped to [-1, 1])."""
    import soundfile

    _check_rate("sample_rate", sample_rate)
    wav = wav.detach().float().cpu()
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    if wav.dim() != 2:
        raise ValueError(f"wav.shape={tuple(wav.shape)}, expected [samples] or [channels, samples]")
    soundfile.write(os.fspath(path), wav.clamp(-1, 1).T.numpy(), sample_rate, subtype="PCM_16")

