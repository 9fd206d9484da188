"""Text -> speech end to end: the LLM speaks `--frames` semantic tokens (500 = a 10 s reply),
SoundStorm fills in levels 2..8, the SpeechTokenizer decoder makes 16 kHz audio. Random weights
in AnyGPT's shapes (anygpt-7b preset bf16, SoundStorm 351M, SpeechTokenizer's published config)
on a GPU; --quick runs the harness on tiny models on a CPU.

Reported (wall clock, synchronized; medians of --repeats where repeated):
  llm_tok_s           the engine's decode speed for the reply (CUDA graphs on a GPU)
  soundstorm_ms       SoundStorm generate for the whole reply (steps=3, greedy; fast path + graphs)
  decoder_ms          RVQ decode + SEANet decoder for the whole reply
  audio_after_last_token_ms   soundstorm + decoder: the whole-utterance path's wait after the
                      LLM's last token (target <= 40 ms on an H100 for 10 s)
  stream_ttfa_ms      streaming: request arrival -> first audio chunk (prefill, the first
                      chunk's tokens, SoundStorm on it, decoder) (target <= 300 ms)
  stream_rtf          streaming wall time / audio duration
  encode_level1_ms    speech input: SpeechTokenizer level-1 encode of 10 s of audio (target <= 5 ms)
and, in the same run, the reference composition AnyGPT's scripts use: transformers' eager
generate on the same weights, SoundStorm's plain-PyTorch float32 path (the same algorithm), and
the float32 decoder; its audio arrives only after the whole generation. GPU name and git sha.

    python benchmarks/bench_speech.py [--quick] [--frames 500] [--no-reference] [--json PATH]
"""

import argparse
import json
import statistics
import time

import torch

from anygpt_engine import Engine, SamplingParams, SoundStorm, SoundStormConfig, Vocabulary, codecs
from anygpt_engine.bench import git_sha, median_wall_ms, run_hf
from anygpt_engine.models.speechtokenizer import SpeechTokenizerConfig
from anygpt_engine.pipelines import SpeechPipeline, StreamConfig, stream_tokens

TARGETS = {"audio_after_last_token_ms": 40.0, "stream_ttfa_ms": 300.0, "encode_level1_ms": 5.0}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(quick: bool, device: torch.device):
    if quick:
        engine = Engine("tiny", device=device, max_batch_size=2)
        storm = SoundStorm(SoundStormConfig(dim=64, depth=2, heads=2, dim_head=32, conv_kernel_size=7),
                           device=device).eval()
        tokenizer = codecs.SpeechTokenizer(SpeechTokenizerConfig(n_filters=8, dimension=64), None, device=device)
    else:
        engine = Engine("anygpt-7b", device=device, max_batch_size=2)
        storm = SoundStorm(SoundStormConfig.anygpt(), device=device).eval()
        tokenizer = codecs.SpeechTokenizer(SpeechTokenizerConfig(), None, device=device)
    return engine, SpeechPipeline(storm, tokenizer)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models on the CPU (a smoke run of the harness)")
    parser.add_argument("--frames", type=int, default=None, help="semantic tokens of the reply (default 500; 40 quick)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true", help="skip the reference composition")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    frames = args.frames or (40 if args.quick else 500)
    repeats = 1 if args.quick else args.repeats
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sha = git_sha()
    engine, speech = build(args.quick, device)
    vocab = Vocabulary.anygpt()
    sosp, eosp = vocab.start_token("speech"), vocab.end_token("speech")
    g = torch.Generator().manual_seed(0)
    prompt = [1] + torch.randint(3, 32000, (args.prompt_len - 2,), generator=g).tolist() + [sosp]
    params = SamplingParams.greedy(frames, min_new_tokens=frames, stop_token_ids=(eosp,))
    if device.type == "cuda":
        speech.soundstorm.capture_graphs([1], [frames])
    print(f"# speech end to end  device={gpu}  frames={frames} ({frames / 50:g} s)  git={sha}", flush=True)

    engine.generate([prompt], SamplingParams.greedy(4))  # warm-up
    llm_ms, reply = median_wall_ms(lambda: engine.generate([prompt], params)[0], device, repeats=1, warmup=0)
    semantic = speech.semantic(reply)
    soundstorm_ms, codes = median_wall_ms(lambda: speech.codes([semantic]), device, repeats)
    decoder_ms, wav = median_wall_ms(lambda: speech.tokenizer.decode([codes[0].T]), device, repeats)
    whole_ms, _ = median_wall_ms(lambda: speech.synthesize(reply), device, repeats)

    def first_audio():
        start = time.perf_counter()
        stream = speech.stream(stream_tokens(engine, prompt, params), config=StreamConfig())
        first = next(stream)
        _sync(device)
        ttfa = (time.perf_counter() - start) * 1e3
        samples = first.shape[0] + sum(chunk.shape[0] for chunk in stream)
        _sync(device)
        return ttfa, (time.perf_counter() - start) * 1e3, samples

    first_audio()  # warm-up (captures SoundStorm's graph buckets for the chunk shapes)
    runs = [first_audio() for _ in range(repeats)]
    ttfa_ms = statistics.median(r[0] for r in runs)
    stream_ms = statistics.median(r[1] for r in runs)
    ten_seconds = torch.randn(1, 160000, generator=g).mul_(0.1).to(device)
    encode_ms, _ = median_wall_ms(lambda: speech.tokenizer.encode(ten_seconds, 16000, levels=1), device, repeats)

    audio_s = frames / 50
    row = dict(gpu=gpu, git_sha=sha, quick=args.quick, frames=frames, audio_s=audio_s, llm_ms=llm_ms,
               llm_tok_s=frames / llm_ms * 1e3, soundstorm_ms=soundstorm_ms, decoder_ms=decoder_ms,
               audio_after_last_token_ms=whole_ms, stream_ttfa_ms=ttfa_ms, stream_total_ms=stream_ms,
               stream_rtf=stream_ms / 1e3 / audio_s, stream_samples=runs[-1][2], wav_samples=int(wav[0].shape[0]),
               encode_level1_ms=encode_ms)
    if not args.no_reference:
        hf = run_hf(engine, [prompt], frames)
        ref_storm_ms, _ = median_wall_ms(lambda: speech.soundstorm.generate([semantic.to(device)], steps=3, seeds=[0],
                                                                  fast=False, backend="torch"), device, 1)
        row.update(reference_llm_tok_s=frames / hf["total_s"], reference_soundstorm_ms=ref_storm_ms,
                   reference_first_audio_ms=hf["total_s"] * 1e3 + ref_storm_ms + decoder_ms)
        row["ttfa_speedup"] = row["reference_first_audio_ms"] / ttfa_ms
    for key, value in row.items():
        if isinstance(value, float):
            print(f"{key:>28} {value:12.2f}" + (f"   (target <= {TARGETS[key]:g})" if key in TARGETS else ""))
        else:
            print(f"{key:>28} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
