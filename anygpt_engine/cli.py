"""Command line: `anygpt-engine bench` (see anygpt_engine.bench), `anygpt-engine bench serve`
(anygpt_engine.serving.benchmark), `anygpt-engine profile`, `anygpt-engine chat` / `generate`
(see anygpt_engine.chat.terminal) and `anygpt-engine serve` (anygpt_engine.serving.server)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path


def _bench(args) -> int:
    from anygpt_engine import bench

    report = bench.benchmark(model=args.model, weights=args.weights, batch_size=args.batch_size,
                             prompt_len=args.prompt_len, new_tokens=args.new_tokens, dtype=args.dtype,
                             device=args.device, compare=args.compare, seed=args.seed,
                             progress=not args.no_progress, modality=args.modality,
                             quantization=args.quantization, tensor_parallel_size=args.tensor_parallel_size)
    if args.tensor_parallel_size > 1:
        _leave_process_group()
    if report is None:  # a tensor-parallel rank other than 0: rank 0 reports
        return 0
    print(bench.format_table(report))
    if args.json:
        bench.write_json(report, args.json)
    return 0


def _profile(args) -> int:
    from anygpt_engine import bench, profiling
    from anygpt_engine.engine import Engine

    nvtx_on = profiling.enable(True)
    engine = Engine(args.model if args.model != "auto" else ("anygpt-7b" if bench.default_device().type == "cuda"
                                                             else "tiny"),
                    device=args.device, cuda_graphs=False if args.eager else None, max_batch_size=args.batch_size)
    prompts = bench._prompts(engine, args.batch_size, args.prompt_len, seed=0)
    bench.run_engine(engine, bench._prompts(engine, args.batch_size, args.prompt_len, seed=1), 4, progress=False)
    cuda = engine.device.type == "cuda"
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.profiler.start()  # for nsys --capture-range=cudaProfilerApi
    result = bench.run_engine(engine, prompts, args.new_tokens, progress=False)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"profiled {engine!r}: batch {args.batch_size}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{'CUDA graphs' if engine.graphs else 'eager'}, NVTX {'on' if nvtx_on else 'unavailable'}; "
          f"ttft {result['ttft_s'] * 1e3:.1f} ms, decode step p50 "
          f"{sorted(result['step_s'])[len(result['step_s']) // 2] * 1e3:.2f} ms")
    return 0


def _chat_setup(args):
    from anygpt_engine.chat import Chat
    from anygpt_engine.chat.media import MediaOptions
    from anygpt_engine.chat.terminal import Turns
    from anygpt_engine.engine import Engine

    engine = Engine(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, seed=args.seed,
                    max_batch_size=8)
    options = MediaOptions(out_dir=Path(args.out), speech_tokenizer=tuple(args.speech_tokenizer or ()) or None,
                           soundstorm=args.soundstorm, music_codec=args.music_codec, voice_prompt=args.voice_prompt,
                           image_tokenizer=args.image_tokenizer, image_vit=args.image_vit,
                           image_diffusion=args.image_diffusion, seed=args.seed, device=args.device)
    if engine.tokenizer is None:
        return engine, None
    chat = Chat(engine, args.template, system=args.system)
    turns = Turns(chat, options, force_modality=args.force_modality, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, seed=args.seed)
    return engine, turns


def _no_tokenizer(args) -> ValueError:
    return ValueError(f"--model {args.model} has no tokenizer files: give --tokenizer DIR (a directory with "
                      "tokenizer.json or tokenizer.model and AnyGPT's added tokens)"
                      + ("" if args.command == "chat" else ", or token ids with --prompt-ids"))


def _chat(args) -> int:
    from anygpt_engine.chat.terminal import interact

    _, turns = _chat_setup(args)
    if turns is None:
        raise _no_tokenizer(args)
    return interact(turns)


def _generate(args) -> int:
    from anygpt_engine.chat.terminal import one_turn

    if (args.message is None) == (args.prompt_ids is None):
        raise ValueError("give exactly one of: a message ('-' reads it from stdin), --prompt-ids IDS")
    engine, turns = _chat_setup(args)
    if args.prompt_ids is not None:
        ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        params = _plain_params(args)
        print(" ".join(str(t) for t in engine.generate([ids], params)[0]))
        return 0
    if turns is None:
        raise _no_tokenizer(args)
    message = sys.stdin.read() if args.message == "-" else args.message
    if args.raw:
        out = engine.generate([message], _plain_params(args))[0]
        print(engine.tokenizer.decode(out))
        return 0
    return one_turn(turns, message, as_json=args.json)


def _serve(args) -> int:
    from anygpt_engine.serving.async_engine import AsyncEngine

    if args.max_waiting is not None and args.max_waiting < 0:
        raise ValueError(f"--max-waiting {args.max_waiting}, expected >= 0")
    if args.cpu_threads is not None:
        import torch

        torch.set_num_threads(args.cpu_threads)
    engine_kwargs = dict(device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, seed=args.seed,
                         max_batch_size=args.max_batch_size, num_blocks=args.num_blocks,
                         kv_cache_memory_fraction=args.kv_cache_memory_fraction, block_size=args.block_size,
                         max_num_batched_tokens=args.max_num_batched_tokens,
                         enable_prefix_caching=not args.no_prefix_caching, quantization=args.quantization)
    if args.eager:
        engine_kwargs.update(cuda_graphs=False, warm_up=False)
    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size {args.tensor_parallel_size}, expected a positive int")
    if args.tensor_parallel_size == 1:
        _serve_engine(args, AsyncEngine.from_model(args.model, max_waiting=args.max_waiting, **engine_kwargs))
        return 0
    # Every rank of the torchrun launch builds its shard; rank 0 serves HTTP while the others follow.
    from anygpt_engine import distributed
    from anygpt_engine.engine import Engine

    if args.device is not None:
        raise ValueError(f"--device {args.device} with --tensor-parallel-size {args.tensor_parallel_size}: each "
                         "rank's device comes from torchrun (cuda:LOCAL_RANK, else the CPU)")
    engine_kwargs["device"] = distributed.init_from_env()
    engine = Engine(args.model, tensor_parallel_size=args.tensor_parallel_size, **engine_kwargs)
    distributed.run(engine, lambda e: _serve_engine(args, AsyncEngine(e, max_waiting=args.max_waiting)))
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Explicitly, not at interpreter exit, where gloo's teardown can abort the process."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _serve_engine(args, engine) -> None:
    from anygpt_engine.serving.image import ImageIO
    from anygpt_engine.serving.server import OpenAIServer, run
    from anygpt_engine.serving.speech import SpeechIO

    try:
        speech = SpeechIO.from_files(tuple(args.speech_tokenizer) if args.speech_tokenizer else None, args.soundstorm,
                                     args.voice_prompt, device=engine.engine.device, vocab=engine.vocab,
                                     voices_dir=args.voices)
        images = ImageIO.from_files(args.image_tokenizer, args.image_vit, args.image_diffusion,
                                    device=engine.engine.device, vocab=engine.vocab)
        server = OpenAIServer(engine, model_name=args.served_model_name or args.model, api_key=args.api_key,
                              speech=speech, images=images, template=args.template,
                              max_body_bytes=args.max_body_bytes)
    except BaseException:
        engine.close()
        raise
    print(f"anygpt-engine serve: {engine.engine!r} as `{server.model_name}` on http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    run(server, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)


def _plain_params(args):
    from anygpt_engine.chat import chat_params

    params = chat_params("text")
    changes = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature),
                                 ("seed", args.seed)) if v is not None}
    if "max_new_tokens" in changes:
        changes["min_new_tokens"] = min(params.min_new_tokens, changes["max_new_tokens"])
    return dataclasses.replace(params, **changes)


def _add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="checkpoint directory or preset (tiny, anygpt-7b; random weights)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer directory (default: the checkpoint's own; presets have none)")
    p.add_argument("--template", default="MMGPT", choices=["MMGPT", "AnyGPT"],
                   help="AnyGPT's conversation template (MMGPT: the name its chat model was trained with)")
    p.add_argument("--system", default=None, help="system message (default: the template's)")
    p.add_argument("--speech-tokenizer", nargs=2, default=None, metavar=("CONFIG", "CKPT"),
                   help="SpeechTokenizer config.json and checkpoint (speech input and output)")
    p.add_argument("--soundstorm", default=None, metavar="PT", help="SoundStorm checkpoint (speech output)")
    p.add_argument("--music-codec", default=None, metavar="DIR", help="EnCodec 32 kHz directory (music)")
    p.add_argument("--voice-prompt", default=None, metavar="WAV", help="voice for speech replies")
    _add_image_arguments(p, "image input and output")
    p.add_argument("--out", default="anygpt_output", metavar="DIR", help="where speech, music and image replies go")
    p.add_argument("--force-modality", action="store_true",
                   help="a line's to_modality also starts the reply with that modality's start token")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override AnyGPT's per-modality maximum")
    p.add_argument("--temperature", type=float, default=None, help="override (0 = greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])


def _add_image_arguments(p: argparse.ArgumentParser, use: str) -> None:
    p.add_argument("--image-tokenizer", default=None, metavar="PATH",
                   help=f"SEED tokenizer: seed_quantizer.pt or its directory ({use})")
    p.add_argument("--image-vit", default=None, metavar="PTH",
                   help="SEED's EVA ViT-g weights, eva_vit_g.pth (default: beside seed_quantizer.pt)")
    p.add_argument("--image-diffusion", default=None, metavar="DIR",
                   help="Stable Diffusion 2.1 unCLIP pipeline directory (draws image replies)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anygpt-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="decode benchmark (default: tiny on CPU, anygpt-7b bf16 on a GPU); "
                                     "`bench serve --help`: the serving benchmark")
    b.add_argument("--model", default="auto", help="preset (tiny, anygpt-7b) or HF checkpoint directory")
    b.add_argument("--weights", default=None, help="checkpoint directory whose weights the preset loads")
    b.add_argument("--batch-size", type=int, default=1)
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=None, help="default 128 on a GPU, 32 on a CPU")
    b.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    b.add_argument("--compare", action="append", choices=["hf", "reference"],
                   help="also run transformers' generate (hf) and/or the torch-reference ops (reference); repeatable")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--modality", default=None, choices=["image", "speech", "music", "audio"],
                   help="end prompts with <soX>: decode inside that span (the LM head reads only its rows)")
    b.add_argument("--quantization", default=None, choices=["int8", "fp8", "int4"],
                   help="weight-only quantization; also reports logits error and greedy agreement vs 16-bit")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    b.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="shard the model over the N ranks of a torchrun launch (docs/distributed.md)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_bench)

    p = sub.add_parser("profile", help="short fixed workload with NVTX ranges, for nsys and ncu (docs/profiling.md)")
    p.add_argument("--model", default="auto", help="preset or checkpoint directory (default as for bench)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--eager", action="store_true",
                   help="no CUDA graphs: every op gets its own NVTX range (graph replays show one range)")
    p.set_defaults(func=_profile)

    c = sub.add_parser("chat", help="interactive chat in the terminal (AnyGPT's chat prompts and line format)")
    _add_chat_arguments(c)
    c.set_defaults(func=_chat)

    g = sub.add_parser("generate", help="one chat turn, for scripts")
    g.add_argument("message", nargs="?", default=None,
                   help="a message or a task|instruction|to_modality|... line; '-' reads it from stdin")
    g.add_argument("--raw", action="store_true", help="send the message as the whole prompt, without the template")
    g.add_argument("--prompt-ids", default=None, metavar="IDS",
                   help="a prompt as token ids (space or comma separated); prints the generated ids (no tokenizer)")
    g.add_argument("--json", action="store_true", help="print the reply as one JSON object")
    _add_chat_arguments(g)
    g.set_defaults(func=_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (docs/serving.md)")
    s.add_argument("--model", default="tiny", help="checkpoint directory or preset (tiny, anygpt-7b; random weights)")
    s.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: --model)")
    s.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer directory (default: the checkpoint's own; presets have none: token ids only)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("ANYGPT_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $ANYGPT_API_KEY, else none)")
    s.add_argument("--max-waiting", type=int, default=None, metavar="N",
                   help="requests allowed to wait for a batch slot; more get 503 (default: unbounded)")
    s.add_argument("--max-batch-size", type=int, default=32)
    s.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: sized from memory)")
    s.add_argument("--kv-cache-memory-fraction", type=float, default=0.4, metavar="F",
                   help="share of the free GPU memory the KV cache takes without --num-blocks, measured when "
                        "the engine starts, before the speech and image models load (leave them room)")
    s.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    s.add_argument("--max-num-batched-tokens", type=int, default=4096, metavar="N",
                   help="prompt tokens one step may prefill (longer prompts are chunked)")
    s.add_argument("--no-prefix-caching", action="store_true", help="do not share cached prompt blocks")
    s.add_argument("--quantization", default=None, choices=["int8", "fp8", "int4"],
                   help="weight-only quantization of the layers' matrices, at load")
    s.add_argument("--eager", action="store_true", help="no CUDA graphs and no start-up warm-up")
    s.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024, help="larger request bodies get 413")
    s.add_argument("--template", default="MMGPT", choices=["MMGPT", "AnyGPT"], help="chat template")
    s.add_argument("--speech-tokenizer", nargs=2, default=None, metavar=("CONFIG", "CKPT"),
                   help="SpeechTokenizer config.json and checkpoint (audio input)")
    s.add_argument("--soundstorm", default=None, metavar="PT", help="SoundStorm checkpoint (audio output)")
    s.add_argument("--voice-prompt", default=None, metavar="WAV", help="voice for audio output")
    s.add_argument("--voices", default=None, metavar="DIR",
                   help="named voices: each NAME.wav in DIR is a voice requests pick with voice: NAME")
    _add_image_arguments(s, "image_url input, image output")
    s.add_argument("--seed", type=int, default=0, help="seeds the random weights of presets and unseeded requests")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    s.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    s.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads (a CPU engine on a busy machine runs best with 1)")
    s.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="shard the model over the N ranks of a torchrun launch; rank 0 serves (docs/distributed.md)")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    s.set_defaults(func=_serve)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "serve"]:
        from anygpt_engine.serving import benchmark

        return benchmark.main(argv[2:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        print(f"anygpt-engine {args.command}: error: {err}", file=sys.stderr)
        from anygpt_engine.models.tensor_parallel import RankFailure

        if isinstance(err, RankFailure):  # torch's gloo teardown with a dead peer can abort at exit
            sys.stderr.flush()
            os._exit(2)
        return 2


if __name__ == "__main__":
    sys.exit(main())
