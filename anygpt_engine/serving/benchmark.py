"""`anygpt-engine bench serve`: a serving benchmark in the manner of vLLM's `bench serve`.

    anygpt-engine bench serve --base-url http://127.0.0.1:8000 --model tiny --num-prompts 200 \\
        --max-concurrency 16 --random-input-len 128 --random-output-len 64 --json out.json
    anygpt-engine bench serve --in-process --model tiny ...      # the same workload, no HTTP

It sends streamed /v1/completions requests (prompts as token ids, so a server needs no tokenizer)
to any OpenAI-compatible server, arriving as a Poisson process (--request-rate, default inf: all
at once), optionally capped at --max-concurrency in flight, and reports per request TTFT (time to
the first token), TPOT (mean time per output token after the first), ITL (time between
streamed chunks) and E2EL (end-to-end latency): mean, median, p99 and std in milliseconds, plus
request and token throughput. `--json` writes vLLM's key names (mean_ttft_ms, p99_tpot_ms,
output_throughput, ...). Failed requests are counted by HTTP status (503 = overloaded).

Workloads: `random` (random text ids, input and output lengths drawn within
--random-range-ratio of the given lengths) and `speech` (AnyGPT-shaped speech replies: a text
prompt that ends with <sosp>, and replies of a few seconds of 50 Hz speech tokens). Outputs have
exactly the drawn length (`ignore_eos`), unless --no-ignore-eos.

`--in-process` sends the same requests without HTTP, to measure what each layer adds: to an
AsyncEngine in this process (`async`, the default), or to a bare Engine stepped by a plain loop
(`engine`, the floor).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

from anygpt_engine.vocab import Vocabulary


@dataclass
class Workload:
    prompt: list[int]
    output_len: int


@dataclass
class Outcome:
    ok: bool
    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""  # "503", "400", "ClientConnectorError", ...


def make_workloads(kind: str, num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                   seed: int, vocab: Vocabulary | None = None) -> list[Workload]:
    """The requests, deterministic in `seed`. Text ids are drawn from [1000, 30000) (ordinary
    LLaMA pieces, no special or added tokens); prompts start with BOS (1)."""
    if kind not in ("random", "speech"):
        raise ValueError(f"dataset={kind!r}, expected 'random' or 'speech'")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"random_range_ratio={range_ratio}, expected 0 <= ratio < 1")
    for name, value in (("num_prompts", num_prompts), ("input_len", input_len), ("output_len", output_len)):
        if value < 1:
            raise ValueError(f"{name}={value}, expected >= 1")
    rng = random.Random(seed)
    vocab = vocab or Vocabulary.anygpt()

    def draw(length):
        return rng.randint(max(1, math.floor(length * (1 - range_ratio))), max(1, math.ceil(length * (1 + range_ratio))))

    out = []
    for _ in range(num_prompts):
        n, m = draw(input_len), draw(output_len)
        prompt = [1] + [rng.randrange(1000, 30000) for _ in range(max(0, n - 1))]
        if kind == "speech":
            prompt = prompt[:max(1, n - 1)] + [vocab.start_token("speech")]
        out.append(Workload(prompt, m))
    return out


def summarize(outcomes: list[Outcome], duration: float, args) -> dict:
    ok = [o for o in outcomes if o.ok]
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            errors[o.error] = errors.get(o.error, 0) + 1
    total_out = sum(o.output_len for o in ok)
    total_in = sum(o.prompt_len for o in ok)
    result = {
        "backend": f"in-process {args.in_process}" if args.in_process else "openai",
        "base_url": None if args.in_process else args.base_url,
        "model": args.model, "dataset": args.dataset, "num_prompts": len(outcomes),
        "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "duration": duration, "completed": len(ok), "failed": len(outcomes) - len(ok), "errors": errors,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": total_out / duration if duration else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration else 0.0,
    }
    series = {
        "ttft": [o.ttft for o in ok],
        "tpot": [(o.e2el - o.ttft) / (o.output_len - 1) for o in ok if o.output_len > 1],
        "itl": [x for o in ok for x in o.itl],
        "e2el": [o.e2el for o in ok],
    }
    for name, values in series.items():
        ms = sorted(v * 1000 for v in values)
        result[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else 0.0
        result[f"median_{name}_ms"] = statistics.median(ms) if ms else 0.0
        result[f"std_{name}_ms"] = statistics.pstdev(ms) if ms else 0.0
        result[f"p99_{name}_ms"] = _percentile(ms, 99) if ms else 0.0
    return result


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def format_table(r: dict) -> str:
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="="),
             f"{'Backend:':<40}{r['backend']:>20}",
             f"{'Successful requests:':<40}{r['completed']:>20}",
             f"{'Failed requests:':<40}{r['failed']:>20}"]
    for status, count in sorted(r["errors"].items()):
        lines.append(f"{'  ' + status + ':':<40}{count:>20}")
    lines += [f"{'Maximum request concurrency:':<40}{str(r['max_concurrency']):>20}",
              f"{'Request rate (req/s):':<40}{str(r['request_rate']):>20}",
              f"{'Benchmark duration (s):':<40}{r['duration']:>20.2f}",
              f"{'Total input tokens:':<40}{r['total_input_tokens']:>20}",
              f"{'Total generated tokens:':<40}{r['total_output_tokens']:>20}",
              f"{'Request throughput (req/s):':<40}{r['request_throughput']:>20.2f}",
              f"{'Output token throughput (tok/s):':<40}{r['output_throughput']:>20.2f}",
              f"{'Total token throughput (tok/s):':<40}{r['total_token_throughput']:>20.2f}"]
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append("{s:{c}^60}".format(s=f" {title} ", c="-"))
        for stat in ("mean", "median", "p99"):
            lines.append(f"{f'{stat.capitalize()} {name.upper()} (ms):':<40}{r[f'{stat}_{name}_ms']:>20.2f}")
    lines.append("=" * 60)
    return "\n".join(lines)


# -- request senders ---------------------------------------------------------------------------------
class HTTPSender:
    """Streamed /v1/completions over aiohttp. Each chunk with choices is a token arrival (as in
    vLLM's benchmark); output tokens are counted from the final usage chunk
    (stream_options.include_usage), or else as those chunks."""

    def __init__(self, base_url: str, model: str, api_key: str | None, ignore_eos: bool, timeout: float):
        import aiohttp

        self.url = base_url.rstrip("/") + "/v1/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.ignore_eos = ignore_eos
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout),
                                             read_bufsize=1 << 20)

    async def close(self):
        await self.session.close()

    async def send(self, w: Workload) -> Outcome:
        payload = {"model": self.model, "prompt": w.prompt, "max_tokens": w.output_len, "temperature": 0.0,
                   "stream": True, "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            payload["ignore_eos"] = True
        out = Outcome(ok=False, prompt_len=len(w.prompt))
        start = last = time.perf_counter()
        chunks = 0
        try:
            async with self.session.post(self.url, json=payload, headers=self.headers) as response:
                if response.status != 200:
                    out.error = str(response.status)
                    await response.read()
                    return out
                buffer = b""
                async for data in response.content.iter_any():
                    buffer += data
                    while b"\n\n" in buffer:
                        event, buffer = buffer.split(b"\n\n", 1)
                        line = event.strip()
                        if not line.startswith(b"data:"):
                            continue
                        body = line[5:].strip()
                        if body == b"[DONE]":
                            continue
                        chunk = json.loads(body)
                        if chunk.get("usage"):
                            out.output_len = chunk["usage"]["completion_tokens"]
                        if not chunk.get("choices"):  # the usage chunk
                            continue
                        now = time.perf_counter()
                        if chunks == 0:
                            out.ttft = now - start
                        else:
                            out.itl.append(now - last)
                        last = now
                        chunks += 1
        except Exception as err:  # noqa: BLE001 - a benchmark records failures and goes on
            out.error = type(err).__name__
            return out
        out.e2el = time.perf_counter() - start
        out.output_len = out.output_len or chunks
        out.ok = chunks > 0
        if not out.ok:
            out.error = "empty"
        return out


class InProcessSender:
    """The same requests straight into an AsyncEngine in this process."""

    def __init__(self, engine, ignore_eos: bool):
        self.engine = engine
        self.ignore_eos = ignore_eos

    async def close(self):
        await self.engine.shutdown(drain=False)

    async def send(self, w: Workload) -> Outcome:
        from anygpt_engine.sampling import SamplingParams
        from anygpt_engine.serving.async_engine import EngineOverloaded

        params = SamplingParams(temperature=0.0, max_new_tokens=w.output_len,
                                stop_token_ids=() if self.ignore_eos else None)
        out = Outcome(ok=False, prompt_len=len(w.prompt))
        start = last = time.perf_counter()
        try:
            async for step in self.engine.generate(w.prompt, params):
                if not step.new_token_ids:
                    continue
                now = time.perf_counter()
                if out.output_len == 0:
                    out.ttft = now - start
                else:
                    out.itl.append(now - last)
                last = now
                out.output_len += len(step.new_token_ids)
        except EngineOverloaded:
            out.error = "503"
            return out
        except (ValueError, TypeError) as err:
            out.error = f"400 {err}"
            return out
        out.e2el = time.perf_counter() - start
        out.ok = out.output_len > 0
        return out


def run_engine_direct(engine, workloads: list[Workload], max_concurrency: int | None, ignore_eos: bool,
                      progress: bool) -> tuple[list[Outcome], float]:
    """The same workloads on a bare Engine driven by a plain step loop in this thread (no asyncio,
    no engine thread): the floor that AsyncEngine and the HTTP server are measured against. All
    requests arrive at once; at most max_concurrency are in the engine at a time."""
    from tqdm import tqdm

    from anygpt_engine.sampling import SamplingParams

    bar = tqdm(total=len(workloads), disable=not progress, file=sys.stderr, desc="requests")
    outcomes = [Outcome(ok=False, prompt_len=len(w.prompt)) for w in workloads]
    starts, lasts, active, nxt = {}, {}, set(), 0
    limit = max_concurrency or len(workloads)
    start = time.perf_counter()
    while nxt < len(workloads) or active:
        while nxt < len(workloads) and len(active) < limit:
            w = workloads[nxt]
            params = SamplingParams(temperature=0.0, max_new_tokens=w.output_len,
                                    stop_token_ids=() if ignore_eos else None)
            engine.add_request(w.prompt, params, request_id=nxt)
            starts[nxt] = time.perf_counter()
            active.add(nxt)
            nxt += 1
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            o = outcomes[out.request_id]
            if out.new_token_ids:
                if o.output_len == 0:
                    o.ttft = now - starts[out.request_id]
                else:
                    o.itl.append(now - lasts[out.request_id])
                lasts[out.request_id] = now
                o.output_len += len(out.new_token_ids)
            if out.finished:
                o.e2el, o.ok = now - starts[out.request_id], o.output_len > 0
                active.discard(out.request_id)
                bar.update(1)
    bar.close()
    return outcomes, time.perf_counter() - start


async def run_benchmark(sender, workloads: list[Workload], request_rate: float, max_concurrency: int | None,
                        seed: int, progress: bool) -> tuple[list[Outcome], float]:
    """Sends every workload (Poisson arrivals at request_rate, or all at once for inf), at most
    max_concurrency in flight; returns the outcomes in workload order and the wall time."""
    from tqdm import tqdm

    rng = random.Random(seed + 1)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(workloads), disable=not progress, file=sys.stderr, desc="requests")

    async def one(w):
        if gate is None:
            result = await sender.send(w)
        else:
            async with gate:
                result = await sender.send(w)
        bar.update(1)
        return result

    start = time.perf_counter()
    tasks = []
    for w in workloads:
        tasks.append(asyncio.create_task(one(w)))
        if request_rate != math.inf:
            await asyncio.sleep(rng.expovariate(request_rate))
    outcomes = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return list(outcomes), duration


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anygpt-engine bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (its /v1/completions is used)")
    p.add_argument("--model", required=True, help="the model name the server serves (with --in-process: the preset "
                                                   "or checkpoint to load)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--in-process", nargs="?", const="async", default=None, choices=["async", "engine"],
                   help="no HTTP: drive an AsyncEngine in this process (async), or a bare Engine from a step "
                        "loop (engine; request rate inf only)")
    p.add_argument("--device", default=None, help="--in-process: cpu, cuda (default: cuda when available)")
    p.add_argument("--max-batch-size", type=int, default=32, help="--in-process: the engine's batch size")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson arrivals (default inf)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--dataset", default="random", choices=["random", "speech"])
    p.add_argument("--random-input-len", type=int, default=None, help="default 128 (random), 48 (speech)")
    p.add_argument("--random-output-len", type=int, default=None, help="default 128 (random), 250 = 5 s (speech)")
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths drawn in [len*(1-r), len*(1+r)]")
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS (lengths then vary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=6 * 3600.0, help="per request, seconds")
    p.add_argument("--warmup", type=int, default=1, help="requests sent (and not measured) first")
    p.add_argument("--json", default=None, metavar="PATH", help="write the result with vLLM's key names")
    p.add_argument("--disable-tqdm", action="store_true")
    return p


async def _main(args) -> dict:
    speech = args.dataset == "speech"
    input_len = args.random_input_len or (48 if speech else 128)
    output_len = args.random_output_len or (250 if speech else 128)
    workloads = make_workloads(args.dataset, args.num_prompts, input_len, output_len, args.random_range_ratio,
                               args.seed)
    ignore_eos = not args.no_ignore_eos
    if args.in_process == "engine":
        from anygpt_engine.engine import Engine

        if args.request_rate != math.inf:
            raise ValueError("--in-process engine sends every request at once; use --max-concurrency, not "
                             "--request-rate")
        engine = Engine(args.model, device=args.device, max_batch_size=args.max_batch_size)
        if args.warmup:
            warm = make_workloads(args.dataset, args.warmup, input_len, min(output_len, 8), 0.0, args.seed + 7)
            run_engine_direct(engine, warm, None, ignore_eos, progress=False)
        outcomes, duration = run_engine_direct(engine, workloads, args.max_concurrency, ignore_eos,
                                               progress=not args.disable_tqdm)
        return summarize(outcomes, duration, args)
    if args.in_process:
        from anygpt_engine.serving.async_engine import AsyncEngine

        engine = AsyncEngine.from_model(args.model, device=args.device, max_batch_size=args.max_batch_size)
        sender = InProcessSender(engine, ignore_eos)
    else:
        sender = HTTPSender(args.base_url, args.model, args.api_key, ignore_eos, args.timeout)
    try:
        if args.warmup:
            warm = make_workloads(args.dataset, args.warmup, input_len, min(output_len, 8), 0.0, args.seed + 7)
            await run_benchmark(sender, warm, math.inf, None, args.seed, progress=False)
        outcomes, duration = await run_benchmark(sender, workloads, args.request_rate, args.max_concurrency,
                                                 args.seed, progress=not args.disable_tqdm)
    finally:
        await sender.close()
    return summarize(outcomes, duration, args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.request_rate <= 0:
        print(f"anygpt-engine bench serve: error: --request-rate {args.request_rate}, expected > 0", file=sys.stderr)
        return 2
    if args.max_concurrency is not None and args.max_concurrency < 1:
        print(f"anygpt-engine bench serve: error: --max-concurrency {args.max_concurrency}, expected >= 1",
              file=sys.stderr)
        return 2
    try:
        result = asyncio.run(_main(args))
    except (ValueError, TypeError) as err:
        print(f"anygpt-engine bench serve: error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0
