"""The OpenAI-compatible server, run as `anygpt-engine serve` (tiny preset, no tokenizer) and as a
chat server with a tokenizer and small speech codecs (tests/serving_app.py), both on 127.0.0.1
and driven with the official `openai` client: completions equal Engine.generate for the same seed,
streamed or not; 32 concurrent streams; a client that disconnects frees its blocks; every bad
input gets its OpenAI-shaped error and the server keeps serving; chat and audio endpoints equal
their in-process references; `bench serve` reports vLLM's keys."""

import asyncio
import base64
import dataclasses
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from anygpt_engine import Chat, ChatTemplate, Engine, SamplingParams
from anygpt_engine.chat import chat_params, parse_reply
from anygpt_engine.serving.speech import SPEECH_TO_TEXT, TEXT_TO_SPEECH, read_wav_bytes, wav_bytes
from serving_app import ROOT, ServerProcess, free_port, tiny_speech

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "sk-test"


def metrics(base: str) -> dict:
    """Unlabelled samples of /metrics, plus finished-request counts by reason."""
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def wait_idle(base: str) -> dict:
    """/metrics once no request runs or waits and no KV block is held (bounded wait)."""
    for _ in range(200):
        m = metrics(base)
        if m["anygpt_kv_blocks_used"] == 0 and m["anygpt_requests_running"] == 0 and m["anygpt_requests_waiting"] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError(f"the server did not go idle: {m}")


def post(base: str, path: str, data, headers=None) -> tuple[int, dict]:
    request = urllib.request.Request(base + path, data=data, headers={"Authorization": f"Bearer {KEY}",
                                                                      "Content-Type": "application/json",
                                                                      **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# -- the tiny preset through `anygpt-engine serve` -------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    proc = ServerProcess(["-m", "anygpt_engine.cli", "serve", "--model", "tiny", "--device", "cpu", "--port",
                          str(port), "--api-key", KEY, "--max-waiting", "40", "--num-blocks", "600",
                          "--max-body-bytes", "200000", "--cpu-threads", "1"],
                         port, tmp_path_factory.mktemp("serve") / "server.log")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine():
    return Engine("tiny", device="cpu", num_blocks=600)


CASES = [  # prompt, request fields, the same as SamplingParams
    ([1, 5, 6, 7, 8], dict(max_tokens=9, seed=7, top_p=0.9), SamplingParams(max_new_tokens=9, seed=7, top_p=0.9)),
    ([1, 32000, 41222], dict(max_tokens=6, temperature=0), SamplingParams.greedy(6)),
    (list(range(1, 130)), dict(max_tokens=11, seed=3, temperature=0.7,
                               extra_body=dict(top_k=40, repetition_penalty=1.2, min_tokens=11)),
     SamplingParams(max_new_tokens=11, seed=3, temperature=0.7, top_k=40, repetition_penalty=1.2, min_new_tokens=11)),
]


def test_completions_equal_engine_generate(client, engine):
    for prompt, fields, params in CASES:
        expected = engine.generate([prompt], params)[0]
        fields = dict(fields)
        extra = {**fields.pop("extra_body", {}), "return_token_ids": True}
        full = client.completions.create(model="tiny", prompt=prompt, extra_body=extra, **fields).model_dump()
        choice = full["choices"][0]
        assert choice["token_ids"] == expected and choice["prompt_token_ids"] == prompt
        assert choice["finish_reason"] == ("length" if len(expected) == params.max_new_tokens else "stop")
        assert choice["text"] == ""  # no tokenizer: token ids only
        usage = {k: v for k, v in full["usage"].items() if v is not None}
        assert usage == {"prompt_tokens": len(prompt), "completion_tokens": len(expected),
                         "total_tokens": len(prompt) + len(expected)}
        chunks = [c.model_dump() for c in client.completions.create(
            model="tiny", prompt=prompt, stream=True, stream_options={"include_usage": True}, extra_body=extra,
            **fields)]
        streamed = [t for c in chunks for ch in c["choices"] for t in ch["token_ids"]]
        assert streamed == expected and len(chunks) == len(expected) + 1  # a chunk per token, then usage
        assert [ch["finish_reason"] for c in chunks[:-1] for ch in c["choices"]][-1] == choice["finish_reason"]
        assert chunks[0]["choices"][0]["prompt_token_ids"] == prompt
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(expected)


def engine_logprobs(engine, prompt, params):
    """(token ids, TokenLogprobs) of one request driven in process."""
    rid = engine.add_request(prompt, params)
    ids, entries = [], []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                ids += out.new_token_ids
                entries += out.logprobs or []
    return ids, entries


def test_completion_logprobs_equal_the_engines(client, engine):
    """logprobs=N returns each token's log-probability and N alternatives, as the engine computes
    them for the same request; streamed chunks carry their own token's; no tokenizer: token_id:N."""
    prompt = [1, 5, 6, 7, 8]
    ids, entries = engine_logprobs(engine, prompt, SamplingParams(max_new_tokens=6, seed=7, top_p=0.9, logprobs=3))
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, seed=7, top_p=0.9, logprobs=3,
                                     extra_body={"return_token_ids": True}).model_dump()["choices"][0]
    assert full["token_ids"] == ids
    lp = full["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in ids] and lp["text_offset"] == [0] * len(ids)
    assert lp["token_logprobs"] == pytest.approx([e.logprob for e in entries], abs=1e-5)
    assert [list(top) for top in lp["top_logprobs"]] == [[f"token_id:{t}" for t, _ in e.top] for e in entries]
    assert all(len(top) == 3 for top in lp["top_logprobs"])
    chunks = [c.model_dump()["choices"][0] for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=6, seed=7, top_p=0.9, logprobs=3, stream=True)]
    assert [t for c in chunks for t in c["logprobs"]["token_logprobs"]] == lp["token_logprobs"]
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=2).model_dump()["choices"][0]
    assert plain["logprobs"] is None
    # echo (how lm-eval scores a continuation): the prompt's tokens first, each given the ones before it
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, seed=7, top_p=0.9, logprobs=3,
                                       echo=True).model_dump()["choices"][0]["logprobs"]
    scored = engine.prompt_logprobs(prompt, top=3)
    assert echoed["tokens"] == [f"token_id:{t}" for t in prompt + ids]
    assert echoed["token_logprobs"][0] is None and echoed["top_logprobs"][0] is None
    assert echoed["token_logprobs"][1:len(prompt)] == pytest.approx([e.logprob for e in scored[1:]], abs=1e-5)
    assert echoed["token_logprobs"][len(prompt):] == lp["token_logprobs"]


def test_n_choices_are_requests_with_consecutive_seeds(client, server, engine):
    """n=3 with seed 7: choice i is the request with seed 7 + i, in full responses and streamed
    (chunks interleave, each names its choice); usage counts every choice; a client that leaves a
    3-choice stream frees every choice's blocks."""
    prompt = [1, 9, 8, 7, 6]
    expected = engine.generate([prompt] * 3, [SamplingParams(max_new_tokens=5, seed=7 + i, top_k=30,
                                                             stop_token_ids=()) for i in range(3)])
    extra = {"return_token_ids": True, "top_k": 30, "ignore_eos": True}
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, seed=7, n=3,
                                     extra_body=extra).model_dump()
    assert [c["index"] for c in full["choices"]] == [0, 1, 2]
    assert [c["token_ids"] for c in full["choices"]] == expected
    assert full["usage"]["completion_tokens"] == 15
    streamed = {0: [], 1: [], 2: []}
    for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=5, seed=7, n=3, stream=True,
                                           extra_body=extra):
        for c in chunk.model_dump()["choices"]:
            streamed[c["index"]] += c["token_ids"]
    assert [streamed[i] for i in range(3)] == expected
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=200, n=3, stream=True)
    next(iter(stream))
    stream.close()
    assert wait_idle(server.base)["anygpt_kv_blocks_used"] == 0
    for bad_n in (0, 17):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="tiny", prompt=prompt, max_tokens=2, n=bad_n)
        assert info.value.param == "n"


def test_best_of_returns_the_highest_logprob_per_token(client, engine):
    """best_of=3, n=2 with seed 4: candidates seeded 4, 5, 6; the two with the highest mean
    log-probability per token come back, best first; usage counts all three."""
    prompt = [1, 40, 41, 42]
    candidates = []
    for i in range(3):
        ids, entries = engine_logprobs(engine, prompt, SamplingParams(max_new_tokens=6, seed=4 + i, temperature=1.2,
                                                                      logprobs=0, stop_token_ids=()))
        candidates.append((sum(e.logprob for e in entries) / len(entries), ids))
    assert len({score for score, _ in candidates}) == 3
    best = [ids for _, ids in sorted(candidates, key=lambda c: -c[0])[:2]]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, seed=4, temperature=1.2, n=2,
                                    best_of=3, extra_body={"return_token_ids": True, "ignore_eos": True}).model_dump()
    assert [c["token_ids"] for c in out["choices"]] == best and [c["index"] for c in out["choices"]] == [0, 1]
    assert out["choices"][0]["logprobs"] is None and out["usage"]["completion_tokens"] == 18
    for fields in (dict(n=2, best_of=1), dict(best_of=2, stream=True)):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="tiny", prompt=prompt, max_tokens=2, **fields)
        assert info.value.param == "best_of"


def test_serve_engine_flags(tmp_path):
    """serve's engine flags reach the engine: an int8, 8-token-block, uncached, eager server
    gives the tokens of that engine built in process."""
    port = free_port()
    proc = ServerProcess(["-m", "anygpt_engine.cli", "serve", "--model", "tiny", "--device", "cpu", "--port", str(port),
                          "--quantization", "int8", "--block-size", "8", "--no-prefix-caching", "--eager",
                          "--max-num-batched-tokens", "64", "--num-blocks", "64", "--cpu-threads", "1"],
                         port, tmp_path / "server.log")
    try:
        local = openai.OpenAI(base_url=proc.base + "/v1", api_key="none", max_retries=0, timeout=60)
        prompt = list(range(1, 100))  # longer than one step's 64 tokens: a chunked prefill
        got = local.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=0,
                                       extra_body={"return_token_ids": True}).model_dump()["choices"][0]
        m = metrics(proc.base)
    finally:
        proc.stop()
    reference = Engine("tiny", device="cpu", quantization="int8", block_size=8, enable_prefix_caching=False,
                       max_num_batched_tokens=64, num_blocks=64)
    ids, entries = engine_logprobs(reference, prompt, SamplingParams.greedy(5, logprobs=0))
    assert got["token_ids"] == ids and m["anygpt_kv_blocks_total"] == 63
    assert got["logprobs"]["token_logprobs"] == pytest.approx([e.logprob for e in entries], abs=1e-5)
    _, unquantized = engine_logprobs(Engine("tiny", device="cpu"), prompt, SamplingParams.greedy(5, logprobs=0))
    assert max(abs(a.logprob - b.logprob) for a, b in zip(entries, unquantized)) > 1e-4  # int8 was applied


def test_32_concurrent_streams(server, engine):
    rng = random.Random(1)
    prompts = [[1] + [rng.randrange(3, 53516) for _ in range(rng.randint(1, 40))] for _ in range(32)]
    params = [SamplingParams(max_new_tokens=rng.randint(2, 5), seed=i, top_k=rng.choice([0, 20])) for i in range(32)]
    expected = engine.generate(prompts, params)

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=60)

        async def one(prompt, p):
            stream = await aclient.completions.create(
                model="tiny", prompt=prompt, max_tokens=p.max_new_tokens, seed=p.seed, stream=True,
                extra_body={"top_k": p.top_k, "return_token_ids": True})
            return [t async for chunk in stream for t in chunk.model_dump()["choices"][0]["token_ids"]]

        try:
            return await asyncio.gather(*(one(prompt, p) for prompt, p in zip(prompts, params)))
        finally:
            await aclient.close()

    assert asyncio.run(asyncio.wait_for(main(), 120)) == expected
    wait_idle(server.base)


def test_disconnect_mid_stream_frees_blocks(client, server):
    before = metrics(server.base).get('anygpt_requests_finished_total{finish_reason="abort"}', 0)
    stream = client.completions.create(model="tiny", prompt=list(range(1, 60)), max_tokens=3000, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks), next(chunks)
    busy = metrics(server.base)
    assert busy["anygpt_requests_running"] == 1 and busy["anygpt_kv_blocks_used"] >= 4
    stream.close()  # the client goes away mid-stream
    idle = wait_idle(server.base)
    assert idle['anygpt_requests_finished_total{finish_reason="abort"}'] == before + 1
    assert idle["anygpt_generation_tokens_total"] < busy["anygpt_generation_tokens_total"] + 2900

    # Without streaming too: the client hangs up while waiting for the whole reply.
    body = json.dumps({"model": "tiny", "prompt": list(range(1, 60)), "max_tokens": 3000, "ignore_eos": True})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        for _ in range(100):
            if metrics(server.base)["anygpt_requests_running"] == 1:
                break
            time.sleep(0.02)
        assert metrics(server.base)["anygpt_kv_blocks_used"] >= 4
    idle = wait_idle(server.base)
    assert idle['anygpt_requests_finished_total{finish_reason="abort"}'] == before + 2
    assert "Traceback" not in server.log.read_text()  # a hang-up is not a server error


def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(client, server, engine):
    def error(exc_type, **fields):
        with pytest.raises(exc_type) as info:
            client.completions.create(model=fields.pop("model", "tiny"), **fields)
        return info.value

    cases = [(dict(prompt=[1, 2], max_tokens=-1), "max_tokens", None),
             (dict(prompt=[1, 2], max_tokens=4095), "max_tokens", "context_length_exceeded"),
             (dict(prompt=[1, 2], temperature=-0.5), "temperature", None),
             (dict(prompt=[1, 2], top_p=0), "top_p", None),
             (dict(prompt=[1, 2], top_p=1.5), "top_p", None),
             (dict(prompt=[1, 53516]), "prompt", "invalid_token_id"),
             (dict(prompt=[1] * 4096), "prompt", "context_length_exceeded"),
             (dict(prompt="text needs a tokenizer"), "prompt", "tokenizer_required"),
             (dict(prompt=[1, 2], extra_body={"stop": ["x"]}), "stop", "tokenizer_required"),
             (dict(prompt=[1, 2], logprobs=21), "logprobs", None),
             (dict(prompt=[1, 2], extra_body={"logprobs": True}), "logprobs", None)]
    for fields, param, code in cases:
        err = error(openai.BadRequestError, **fields)
        assert err.status_code == 400 and err.param == param and err.type == "invalid_request_error", fields
        assert err.code == code and err.message, fields
    err = error(openai.NotFoundError, model="gpt-4", prompt=[1])
    assert err.status_code == 404 and err.code == "model_not_found"
    wrong = openai.OpenAI(base_url=server.base + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.completions.create(model="tiny", prompt=[1])
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError, match="tokenizer"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="speech codecs|tokenizer"):
        client.audio.speech.create(model="tiny", input="hi", voice="alloy")

    status, body = post(server.base, "/v1/completions", b'{"model": "tiny", "prompt": [1, 2')
    assert status == 400 and body["error"]["code"] == "invalid_json" and set(body["error"]) == {
        "message", "type", "param", "code"}
    big = json.dumps({"model": "tiny", "prompt": [1] * 80000}).encode()
    status, body = post(server.base, "/v1/completions", big)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = post(server.base, "/v1/completions", iter([big[i:i + 65536] for i in range(0, len(big), 65536)]))
    assert status == 413 and body["error"]["code"] == "request_too_large"  # chunked: counted as it is read
    status, body = post(server.base, "/v1/nothing-here", b"{}")
    assert status == 404 and body["error"]["code"] == "not_found"

    prompt, fields, params = CASES[0]
    out = client.completions.create(model="tiny", prompt=prompt, extra_body={"return_token_ids": True}, **fields)
    assert out.model_dump()["choices"][0]["token_ids"] == engine.generate([prompt], params)[0]
    assert wait_idle(server.base)["anygpt_kv_blocks_used"] == 0


def test_overload_answers_503_and_leaks_no_blocks(server):
    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=120)

        async def one(i):
            try:
                out = await aclient.completions.create(model="tiny", prompt=[1, 7, i + 3], max_tokens=32,
                                                       extra_body={"ignore_eos": True})
                return out.usage.completion_tokens
            except openai.APIStatusError as err:
                return err.status_code

        try:
            return await asyncio.gather(*(one(i) for i in range(100)))
        finally:
            await aclient.close()

    rejected_before = metrics(server.base)["anygpt_requests_rejected_total"]
    results = asyncio.run(asyncio.wait_for(main(), 180))
    done, refused = results.count(32), [r for r in results if r != 32]
    assert set(refused) <= {503} and refused and done >= 40  # each request completes or gets a 503
    idle = wait_idle(server.base)
    assert idle["anygpt_requests_rejected_total"] - rejected_before == len(refused)


def test_models_health_metrics(client, server):
    models = client.models.list().model_dump()["data"]
    assert [m["id"] for m in models] == ["tiny"] and models[0]["max_model_len"] == 4096
    assert urllib.request.urlopen(server.base + "/health", timeout=10).status == 200
    text = urllib.request.urlopen(server.base + "/metrics", timeout=10).read().decode()
    for name in ("anygpt_requests_running", "anygpt_requests_waiting", "anygpt_kv_blocks_used",
                 "anygpt_kv_blocks_free", "anygpt_prefix_cache_hit_rate", "anygpt_generation_tokens_total",
                 "anygpt_time_to_first_token_seconds_bucket", "anygpt_time_per_output_token_seconds_bucket"):
        assert re.search(rf"^{name}(\{{.*\}})? ", text, re.M), name


def test_bench_serve_reports_vllm_keys(server, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "anygpt_engine.cli", "bench", "serve", "--base-url", server.base, "--model",
           "tiny", "--api-key", KEY, "--num-prompts", "6", "--max-concurrency", "3", "--random-input-len", "8",
           "--random-output-len", "4", "--json", str(out), "--disable-tqdm"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["completed"] == 6 and result["failed"] == 0 and result["total_output_tokens"] == 24
    assert result["total_input_tokens"] == 48 and result["max_concurrency"] == 3
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < result[f"median_{name}_ms"] <= result[f"p99_{name}_ms"], name
    assert result["mean_e2el_ms"] > result["mean_ttft_ms"] and result["output_throughput"] > 0
    assert "Mean TPOT (ms)" in run.stdout


# -- a chat server: tokenizer and speech codecs ---------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    from anygpt_tokenizers import sentencepiece_model, write_sentencepiece_dir

    return write_sentencepiece_dir(tmp_path_factory.mktemp("tok"), sentencepiece_model())


@pytest.fixture(scope="module")
def chat_server(tokenizer_dir, tmp_path_factory):
    port = free_port()
    proc = ServerProcess([str(ROOT / "tests" / "serving_app.py"), "--port", str(port), "--tokenizer",
                          str(tokenizer_dir)], port, tmp_path_factory.mktemp("chat") / "server.log")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def chat_client(chat_server):
    return openai.OpenAI(base_url=chat_server.base + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def chat_engine(tokenizer_dir):
    return Engine("tiny", device="cpu", tokenizer=tokenizer_dir, num_blocks=400, max_batch_size=8)


@pytest.fixture(scope="module")
def speech(chat_engine):
    return tiny_speech(chat_engine.vocab)


def stops(engine) -> tuple[int, ...]:
    return (engine.tokenizer.token_to_id("<eos>"), engine.tokenizer.eos_token_id)


def test_chat_equals_chat_send(chat_client, chat_engine):
    message = "Hello there, who are you?"
    params = dataclasses.replace(chat_params("text"), max_new_tokens=14, seed=9)
    reply = Chat(chat_engine, params=params).send(message)
    messages = [{"role": "user", "content": message}]
    full = chat_client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=14, seed=9,
                                               extra_body={"return_token_ids": True}).model_dump()
    choice = full["choices"][0]
    assert choice["token_ids"] == reply.token_ids
    assert full["prompt_token_ids"] == chat_engine.tokenizer.encode(ChatTemplate.anygpt().render(messages))
    text = choice["message"]["content"]
    assert text == chat_engine.tokenizer.decode([t for t in reply.token_ids if t not in stops(chat_engine)])
    assert text.strip() == reply.raw and text
    chunks = [c.model_dump() for c in chat_client.chat.completions.create(
        model="tiny-chat", messages=messages, max_tokens=14, seed=9, stream=True)]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]


def test_chat_logprobs(chat_client, chat_engine):
    """logprobs: true with top_logprobs: each reply token's entry (its text, log-probability and
    bytes) equals the engine's for the same request; top_logprobs without logprobs is a 400."""
    messages = [{"role": "user", "content": "Hello there, who are you?"}]
    full = chat_client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=8, seed=3,
                                               logprobs=True, top_logprobs=2,
                                               extra_body={"return_token_ids": True}).model_dump()
    choice = full["choices"][0]
    params = dataclasses.replace(chat_params("text"), max_new_tokens=8, seed=3, logprobs=2,
                                 stop_token_ids=stops(chat_engine))
    ids, entries = engine_logprobs(chat_engine, full["prompt_token_ids"], params)
    assert choice["token_ids"] == ids
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [chat_engine.tokenizer.decode([t]) for t in ids]
    assert [c["logprob"] for c in content] == pytest.approx([e.logprob for e in entries], abs=1e-5)
    assert all(c["bytes"] == list(c["token"].encode()) and len(c["top_logprobs"]) == 2 for c in content)
    chunks = [c.model_dump() for c in chat_client.chat.completions.create(
        model="tiny-chat", messages=messages, max_tokens=8, seed=3, logprobs=True, stream=True)]
    streamed = [e for c in chunks[1:] if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["logprob"] for e in streamed] == [c["logprob"] for c in content]
    assert all(e["top_logprobs"] == [] for e in streamed)
    with pytest.raises(openai.BadRequestError) as info:
        chat_client.chat.completions.create(model="tiny-chat", messages=messages, top_logprobs=2)
    assert info.value.param == "top_logprobs"


def test_chat_n_choices(chat_client):
    """Chat with n=2 and a seed: choice i is the one-choice reply with seed + i, streamed too;
    several audio replies in one request are refused."""
    messages = [{"role": "user", "content": "Tell me something."}]
    kwargs = dict(model="tiny-chat", messages=messages, max_tokens=6, extra_body={"return_token_ids": True})
    one = [chat_client.chat.completions.create(seed=seed, **kwargs).model_dump()["choices"][0] for seed in (4, 5)]
    two = chat_client.chat.completions.create(seed=4, n=2, **kwargs).model_dump()["choices"]
    assert [c["token_ids"] for c in two] == [c["token_ids"] for c in one]
    assert [c["message"]["content"] for c in two] == [c["message"]["content"] for c in one]
    text = {0: "", 1: ""}
    for chunk in chat_client.chat.completions.create(seed=4, n=2, stream=True, **kwargs):
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
    assert [text[0], text[1]] == [c["message"]["content"] for c in one]
    with pytest.raises(openai.BadRequestError) as info:
        chat_client.chat.completions.create(model="tiny-chat", messages=messages, n=2, modalities=["text", "audio"],
                                            audio={"voice": "low", "format": "wav"})
    assert info.value.param == "n"


def test_echo_gives_the_prompt_text_and_exact_offsets(chat_client, chat_engine):
    prompt = "Hello there, what is a cat?"
    out = chat_client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=4, seed=2, logprobs=1,
                                         echo=True).model_dump()["choices"][0]
    ids = chat_engine.tokenizer.encode(prompt)
    lp = out["logprobs"]
    assert out["text"].startswith(chat_engine.tokenizer.decode(ids)) and len(lp["tokens"]) == len(ids) + 4
    offsets = lp["text_offset"] + [len(out["text"])]
    pieces = [out["text"][a:b] for a, b in zip(offsets, offsets[1:])]
    decode = chat_engine.tokenizer.decode
    assert pieces[:len(ids)] == [decode(ids[:i + 1])[len(decode(ids[:i])):] for i in range(len(ids))]
    assert "".join(pieces) == out["text"] and offsets[0] == 0
    assert lp["token_logprobs"][0] is None and all(v <= 0 for v in lp["token_logprobs"][1:])


def test_text_completion_with_stop_strings(chat_client):
    kwargs = dict(model="tiny-chat", prompt="Hello, what can you do?", max_tokens=24, seed=1,
                  extra_body={"ignore_eos": True})
    full = chat_client.completions.create(**kwargs).choices[0].text
    assert len(full) > 12
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = chat_client.completions.create(stop=[stop, "never-there"], **kwargs).choices[0]
    assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"
    streamed = list(chat_client.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def voice_wav(seconds: float) -> bytes:
    t = torch.arange(int(seconds * 16000)) / 16000
    return wav_bytes(0.4 * torch.sin(2 * torch.pi * 150 * t) + 0.05 * torch.sin(2 * torch.pi * 1100 * t), 16000)


def test_chat_with_audio_in_and_out(chat_client, chat_engine, speech):
    data = voice_wav(0.4)
    spoken = speech.prompt_ids(*read_wav_bytes("wav", data))
    assert len(spoken) == 20 + 2
    content = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": "wav"}},
               {"type": "text", "text": "Please answer aloud."}]
    full = chat_client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": content}], modalities=["text", "audio"],
        audio={"voice": "low", "format": "wav"}, max_tokens=16, seed=3,
        extra_body={"return_token_ids": True}).model_dump()
    prompt, ids = full["prompt_token_ids"], full["choices"][0]["token_ids"]
    start = prompt.index(spoken[0])
    assert prompt[start:start + len(spoken)] == spoken  # the wav's level-1 codes, as <sosp> ... <eosp>
    assert prompt[-1] == chat_engine.vocab.start_token("speech")  # the reply is forced to speak
    audio = base64.b64decode(full["choices"][0]["message"]["audio"]["data"])
    assert audio == speech.synthesize(ids, voice="low")
    speech_frames = sum(t in chat_engine.vocab.range("speech") for t in ids)
    assert speech_frames > 0 and read_wav_bytes("reply", audio)[0].shape == (1, 320 * speech_frames)
    for bad_part, param in (({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}, ""),
                            ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"not a wav").decode()}},
                             ""),
                            ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, ".image_url"),
                            ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, "")):
        with pytest.raises(openai.BadRequestError) as info:
            chat_client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": [bad_part]}])
        assert info.value.param == "messages[0].content[0]" + param


def test_chat_streams_pcm16_audio_while_it_speaks(chat_client, chat_engine, speech):
    """audio format pcm16, streamed: the reply's audio arrives in chunks while the LLM is still
    speaking (SpeechPipeline.stream: the first after 25 frames), the chunks joined equal the
    pipeline's stream over the reply's tokens, and the last audio chunk carries the transcript.
    Not streamed, pcm16 is the whole utterance's samples."""
    kwargs = dict(model="tiny-chat", messages=[{"role": "user", "content": "Say something long."}],
                  modalities=["text", "audio"], audio={"voice": "high", "format": "pcm16"}, max_tokens=60, seed=5,
                  extra_body={"return_token_ids": True, "ignore_eos": True})
    full = chat_client.chat.completions.create(**kwargs).model_dump()["choices"][0]
    ids = full["token_ids"]
    frames = sum(t in chat_engine.vocab.range("speech") for t in ids)
    assert frames > 25  # more than the first streamed chunk
    whole = base64.b64decode(full["message"]["audio"]["data"])
    assert whole == speech.synthesize(ids, "pcm16", voice="high") and len(whole) == 2 * 320 * frames
    events = []  # ("audio", bytes) / ("text", token count so far) in arrival order
    seen = 0
    for chunk in chat_client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.model_dump()["choices"][0]
        audio = choice["delta"].get("audio")
        if audio and audio.get("data"):
            events.append(("audio", base64.b64decode(audio["data"])))
        elif audio:
            assert audio["transcript"] == full["message"]["content"]
        seen += len(choice.get("token_ids") or [])
        events.append(("tokens", seen))
    streamed = b"".join(data for kind, data in events if kind == "audio")
    from anygpt_engine.serving.speech import pcm16_bytes

    assert streamed == b"".join(pcm16_bytes(w) for w in speech.pipeline.stream(ids, voice=speech.voices["high"]))
    assert sum(kind == "audio" for kind, _ in events) >= 2
    with pytest.raises(openai.BadRequestError) as info:
        chat_client.chat.completions.create(**{**kwargs, "audio": {"voice": "high", "format": "mp3"}})
    assert info.value.param == "audio"


def test_speech_stream_gives_audio_before_the_reply_ends(chat_engine, speech):
    """SpeechStream: 30 speech tokens in (the first chunk is 25 frames) and the first audio is
    ready before end(); the rest follows end(); joined, the pipeline's stream."""
    from anygpt_engine.serving.speech import pcm16_bytes

    values = chat_engine.vocab.range("speech")
    ids = [values[(37 * i) % len(values)] for i in range(40)]

    async def run():
        stream = speech.stream(asyncio.get_running_loop())
        stream.feed(ids[:30])
        first = []
        for _ in range(3000):
            first = stream.ready()
            if first:
                break
            await asyncio.sleep(0.01)
        stream.feed(ids[30:])
        return first, [c async for c in stream.rest()]

    first, rest = asyncio.run(asyncio.wait_for(run(), 60))
    assert first, "no audio before the reply ended"
    assert b"".join(first + rest) == b"".join(pcm16_bytes(w) for w in speech.pipeline.stream(ids, voice=speech.voice))


def test_audio_speech_and_transcriptions(chat_client, chat_server, chat_engine, speech):
    tokenizer, template, vocab = chat_engine.tokenizer, ChatTemplate.anygpt(), chat_engine.vocab
    wav = chat_client.audio.speech.create(model="tiny-chat", input="Hello world", voice="low",
                                          response_format="wav", extra_body={"seed": 5, "max_tokens": 30}).content
    prompt = tokenizer.encode(template.render([{"role": "user", "content": TEXT_TO_SPEECH.format(text="Hello world")}],
                                              force_modality="speech"))
    params = dataclasses.replace(chat_params("speech"), max_new_tokens=30, seed=5,
                                 stop_token_ids=(*stops(chat_engine), vocab.end_token("speech")))
    ids = chat_engine.generate([prompt], params)[0]
    assert wav == speech.synthesize(ids, voice="low") != speech.synthesize(ids, voice="high")
    assert wav == chat_client.audio.speech.create(model="tiny-chat", input="Hello world", voice="low",
                                                  extra_body={"seed": 5, "max_tokens": 30}).content
    pcm = chat_client.audio.speech.create(model="tiny-chat", input="Hello world", voice="low", response_format="pcm",
                                          extra_body={"seed": 5, "max_tokens": 30}).content  # streamed as spoken
    from anygpt_engine.serving.speech import pcm16_bytes

    speech_ids = [t for t in ids if t in vocab.range("speech")]
    assert pcm == b"".join(pcm16_bytes(w) for w in speech.pipeline.stream(ids, voice=speech.voices["low"]))
    assert len(pcm) == 2 * 320 * len(speech_ids)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        chat_client.audio.speech.create(model="tiny-chat", input="Hello", voice="low", response_format="mp3")
    with pytest.raises(openai.BadRequestError) as info:  # named voices: no silent fallback for an unknown one
        chat_client.audio.speech.create(model="tiny-chat", input="Hello", voice="alloy")
    assert info.value.param == "voice" and info.value.code == "voice_not_found" and "'high', 'low'" in str(info.value)
    with pytest.raises(openai.BadRequestError) as info:
        chat_client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hi"}],
                                            modalities=["text", "audio"], audio={"voice": "nova", "format": "wav"})
    assert info.value.param == "audio.voice"

    data = voice_wav(0.3)
    text = chat_client.audio.transcriptions.create(model="tiny-chat", file=("q.wav", data),
                                                   extra_body={"max_tokens": 12}).text
    spelled = "".join(tokenizer.id_to_token(t) for t in speech.prompt_ids(*read_wav_bytes("wav", data)))
    prompt = tokenizer.encode(template.render([{"role": "user", "content": SPEECH_TO_TEXT.format(speech=spelled)}]))
    params = dataclasses.replace(chat_params("text"), temperature=0.0, max_new_tokens=12, stop_token_ids=stops(
        chat_engine))
    ids = chat_engine.generate([prompt], params)[0]
    assert text == parse_reply(tokenizer.decode([t for t in ids if t not in stops(chat_engine)])).text
    no_file = b'--x\r\nContent-Disposition: form-data; name="model"\r\n\r\ntiny-chat\r\n--x--\r\n'
    status, body = post(chat_server.base, "/v1/audio/transcriptions", no_file,
                        {"Content-Type": "multipart/form-data; boundary=x"})
    assert status == 400 and body["error"]["param"] == "file"


def test_stop_strings_hold_back_partial_matches():
    from anygpt_engine.serving.protocol import StopStrings

    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = text[:min(hits)] if hits else text
        ends = sorted({*rng.sample(range(1, len(text) + 1), k=min(len(text), rng.randint(0, 8))), len(text)})
        cutter, out, pos = StopStrings(stops), "", 0
        for end in ends:
            out += cutter.feed(text[pos:end], final=end == len(text))
            pos = end
            assert expected.startswith(out), (text, stops, out)  # never emits what a stop string may claim
        assert out == expected and cutter.stopped == bool(hits), (text, stops)
