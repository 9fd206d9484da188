"""AsyncEngine on the tiny preset, in-process: streams equal Engine.generate whatever runs beside
them; leaving a stream (cancel, aclose, abort) frees its blocks without touching the others; the
waiting queue is bounded; shutdown drains or aborts; text deltas add up to the decoded text."""

import asyncio
import random

import pytest

from anygpt_engine import Engine, SamplingParams, Tokenizer
from anygpt_engine.serving import AsyncEngine, EngineClosed, EngineOverloaded, IncrementalDetokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[1, 5, 6, 7], [1, 900, 901], list(range(1, 40)), [1, 32000, 41222]]
PARAMS = [SamplingParams(max_new_tokens=9, seed=11, top_k=50), SamplingParams.greedy(7),
          SamplingParams(max_new_tokens=13, seed=5, top_p=0.9, repetition_penalty=1.1),
          SamplingParams.anygpt("speech", seed=2, max_new_tokens=11)]


@pytest.fixture(scope="module")
def reference():
    return Engine("tiny", device="cpu").generate(PROMPTS, PARAMS)


async def collect(agen):
    ids, reasons = [], []
    async for out in agen:
        ids += out.new_token_ids
        reasons.append(out.finish_reason)
    return ids, reasons


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def test_concurrent_streams_equal_engine_generate(reference):
    async def main():
        engine = AsyncEngine.from_model("tiny", device="cpu", num_blocks=64)
        try:
            results = await asyncio.gather(*(collect(engine.generate(p, s)) for p, s in zip(PROMPTS, PARAMS)))
            stats = await engine.stats()
        finally:
            await engine.shutdown()
        return results, stats

    results, stats = run(main())
    for (ids, reasons), expected in zip(results, reference):
        assert ids == expected
        assert reasons[-1] in ("length", "stop") and all(r is None for r in reasons[:-1])
        assert len(reasons) == len(ids)  # one output per step, one token each
    assert stats["used_blocks"] == 0 and stats["running"] == 0 and stats["waiting"] == 0


def test_leaving_a_stream_aborts_it_and_spares_the_others(reference):
    long = SamplingParams(max_new_tokens=3000, seed=1, stop_token_ids=())  # would run for many seconds

    async def main():
        engine = AsyncEngine.from_model("tiny", device="cpu", num_blocks=800)
        try:
            seen = asyncio.Event()

            async def consume(agen):
                async for _ in agen:  # suspended only inside the generator, where the cancel lands
                    seen.set()

            cancelled = asyncio.create_task(consume(engine.generate(PROMPTS[2], long)))
            closed = engine.generate(PROMPTS[0], long)
            await closed.__anext__()
            await seen.wait()
            busy = await engine.stats()
            others = asyncio.gather(*(collect(engine.generate(p, s)) for p, s in zip(PROMPTS, PARAMS)))
            await asyncio.sleep(0.05)
            cancelled.cancel()
            await closed.aclose()
            results = await others
            stream = await engine.add_request(PROMPTS[1], long)
            await stream.__anext__()
            stream.abort()
            tail = [out async for out in stream]
            for _ in range(300):  # the aborts reach the engine thread between steps
                stats = await engine.stats()
                if stats["used_blocks"] == 0:
                    break
                await asyncio.sleep(0.01)
        finally:
            await engine.shutdown()
        return busy, results, tail, stats, cancelled

    busy, results, tail, stats, cancelled = run(main())
    assert busy["used_blocks"] > 0
    assert [ids for ids, _ in results] == reference
    assert tail[-1].finished and tail[-1].finish_reason == "abort" and tail[-1].new_token_ids == []
    assert stats["used_blocks"] == 0 and stats["running"] == 0 and cancelled.cancelled()


def test_waiting_queue_is_bounded():
    async def main():
        engine = AsyncEngine.from_model("tiny", device="cpu", max_batch_size=1, max_waiting=2, num_blocks=64)
        try:
            params = SamplingParams(max_new_tokens=60, seed=0)
            running = await engine.add_request([1, 2, 3], params)
            await running.__anext__()  # it holds the one batch slot for 59 more steps
            outcomes = await asyncio.gather(*(engine.add_request([1, 2, 4 + i], params) for i in range(5)),
                                            return_exceptions=True)
            accepted = [running] + [o for o in outcomes if not isinstance(o, BaseException)]
            for stream in accepted:
                async for _ in stream:
                    pass
            stats = await engine.stats()
        finally:
            await engine.shutdown()
        return outcomes, accepted, stats

    outcomes, accepted, stats = run(main())
    rejected = [o for o in outcomes if isinstance(o, EngineOverloaded)]
    # One request runs (batch size 1) and two wait; the others are refused while the running one
    # holds the slot.
    assert len(accepted) == 3 and len(rejected) == 3 and "max_waiting" in str(rejected[0])
    assert all(len(s.token_ids) == 60 and s.finish_reason == "length" for s in accepted)
    assert stats["rejected"] == 3 and stats["used_blocks"] == 0


def test_shutdown_drains_or_aborts():
    async def main(drain):
        engine = AsyncEngine.from_model("tiny", device="cpu", num_blocks=64)
        stream = await engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=30, seed=0))
        await engine.shutdown(drain=drain)
        outs = [out async for out in stream]
        with pytest.raises(EngineClosed):
            await engine.add_request([1, 2], SamplingParams(max_new_tokens=2))
        return stream, outs, engine.is_running

    stream, outs, running = run(main(True))
    assert len(stream.token_ids) == 30 and outs[-1].finish_reason == "length" and not running
    stream, outs, running = run(main(False))
    assert len(stream.token_ids) < 30 and outs[-1].finish_reason == "abort" and not running


def test_bad_input_and_engine_faults():
    async def main():
        engine = AsyncEngine.from_model("tiny", device="cpu", num_blocks=8)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await engine.add_request([1, 10 ** 6])
        with pytest.raises(TypeError, match="no tokenizer"):
            await engine.add_request("hello")
        with pytest.raises(ValueError, match="needs .* KV blocks"):
            await engine.add_request([1] * 100, SamplingParams(max_new_tokens=200))
        ok = await collect(engine.generate([1, 2, 3], SamplingParams.greedy(3)))

        def broken():
            raise RuntimeError("device lost")

        stream = await engine.add_request([1, 2, 3], SamplingParams.greedy(50))
        engine.engine.step = broken  # the engine thread's next step fails
        with pytest.raises(RuntimeError, match="device lost"):
            async for _ in stream:
                pass
        await asyncio.to_thread(engine._thread.join, 10)
        with pytest.raises(EngineClosed, match="device lost"):
            await engine.add_request([1, 2])
        return ok, engine

    ok, engine = run(main())
    assert len(ok[0]) == 3 and not engine.is_running and isinstance(engine.error, RuntimeError)
    with pytest.raises(ValueError, match="max_waiting"):
        AsyncEngine(Engine("tiny", device="cpu", num_blocks=4), max_waiting=-1)
    with pytest.raises(ValueError, match="model="):
        AsyncEngine.from_model("no-such-model")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    from anygpt_tokenizers import sentencepiece_model, write_sentencepiece_dir

    return Tokenizer.from_pretrained(write_sentencepiece_dir(tmp_path_factory.mktemp("tok"), sentencepiece_model()))


def test_text_deltas_add_up_to_the_decoded_text(tokenizer):
    rng = random.Random(0)
    pieces = list(range(3, 600))  # trained pieces and byte-fallback pieces (partial UTF-8)
    added = [tokenizer.token_to_id(t) for t in ("<sosp>", "<eosp>", "[MMGPT]", "<eos>")] + list(range(40210, 40230))
    for trial in range(30):
        ids = [rng.choice(pieces if rng.random() < 0.8 else added) for _ in range(rng.randint(1, 60))]
        detok = IncrementalDetokenizer(tokenizer, skip={1, 2})
        text = "".join(detok.add([t], final=i == len(ids) - 1) for i, t in enumerate(ids))
        assert text == tokenizer.decode([t for t in ids if t not in (1, 2)]), (trial, ids)


def test_stream_text_with_a_tokenizer(tokenizer):
    async def main():
        engine = AsyncEngine(Engine("tiny", device="cpu", tokenizer=tokenizer, num_blocks=32))
        try:
            stream = await engine.add_request("Hello, who are you?", SamplingParams(max_new_tokens=20, seed=4))
            texts = [out.text async for out in stream]
        finally:
            await engine.shutdown()
        return stream, texts

    stream, texts = run(main())
    assert stream.prompt_token_ids == tokenizer.encode("Hello, who are you?")
    assert "".join(texts) == stream.text == tokenizer.decode([t for t in stream.token_ids if t not in (1, 2)])
    assert len(stream.text) > 0
