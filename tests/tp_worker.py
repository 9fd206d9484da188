"""One rank of the tensor-parallel tests (tests/test_tensor_parallel.py starts two of these with
torch.distributed's environment variables, as torchrun would).

    python tests/tp_worker.py SCENARIO OUT_JSON TIMEOUT_S CHECKPOINT...

compare: for each checkpoint, rank 0 records `trace(engine)` into OUT_JSON. graphs: the same after
a start-up warm-up, with decode steps replayed from captured graphs (tests/graph_stand_in.py:
CUDA graphs on the CPU).
kill / hang: rank 1 SIGKILLs itself / sleeps mid-step (in its 8th feed-forward); badload: rank 1
is given weights that do not match the checkpoint's config; rank 0 records the error it gets."""

import itertools
import json
import os
import signal
import sys
import time

import torch

from anygpt_engine import Engine, SamplingParams
from graph_stand_in import patch_cuda, stand_in_graphs

PROMPTS = [[1, 17, 250, 3, 99, 42, 7], [1, 5], [1, 200, 100, 33, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
HEAD_ROWS = [(0, 301), (100, 120), (160, 20), (5, 3), (150, 2)]  # 301 rows: rank 0 holds 0-150, rank 1 151-300


def trace(engine) -> dict:
    """Everything the tests compare between one rank and two: greedy generate, prompt logits,
    the LM head over row ranges across the shard boundary, and a serving loop with an abort, a
    late arrival and a beam search (whose forks copy KV blocks)."""
    out = {"generate": engine.generate(PROMPTS, SamplingParams.greedy(8, stop_token_ids=())),
           "logits": engine.logits(PROMPTS[2]).tolist()}
    x = torch.randn(3, engine.config.hidden_size, generator=torch.Generator().manual_seed(5), dtype=engine.dtype)
    with torch.inference_mode():
        out["head"] = [engine.model.head(x, torch.tensor(rows)).tolist() for rows in HEAD_ROWS]
    greedy = SamplingParams.greedy(6, stop_token_ids=())
    ids = [engine.add_request(p, greedy) for p in PROMPTS]
    engine.add_request([1, 9, 8, 7, 6, 5, 4, 3, 2, 11, 12, 13, 14, 15, 16, 17, 18],
                       SamplingParams(temperature=0.0, num_beams=2, max_new_tokens=5, stop_token_ids=()),
                       request_id="beam")
    events, step = [], 0
    while engine.has_unfinished():
        events += [[step, o.request_id, o.new_token_ids, o.finished, o.finish_reason] for o in engine.step()]
        step += 1
        if step == 2:
            engine.abort(ids[1])
        if step == 3:
            engine.add_request([1, 4, 4, 4, 4], greedy, request_id="late")
    out["serve"] = events
    return out


def sabotage(engine, how: str) -> None:
    calls = itertools.count()
    feed_forward = engine.model.feed_forward

    def broken(block, h):
        if next(calls) == 7:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        return feed_forward(block, h)

    engine.model.feed_forward = broken


def main() -> int:
    from anygpt_engine.distributed import RankFailure, init_from_env, run

    scenario, out_path, timeout_s, checkpoints = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
    init_from_env(timeout_s=timeout_s)
    results = []
    for path in checkpoints:
        weights = {"model.norm.weight": torch.ones(3)} if scenario == "badload" and os.environ["RANK"] == "1" else None
        engine = Engine(path, weights, device="cpu", dtype=torch.float32, tensor_parallel_size=2,
                        max_batch_size=8, warm_up=scenario == "graphs")  # ranks warm up in lockstep
        if scenario == "graphs":
            patch_cuda(setattr)
            stand_in_graphs(engine)
        elif scenario != "compare" and engine.model.shard.rank == 1:
            sabotage(engine, scenario)
        try:
            results.append(run(engine, trace))
            if results[-1] is not None and engine.graphs is not None:
                results[-1]["graphs_used"] = sorted(engine.graphs.used)
        except RankFailure as err:
            with open(out_path, "w") as f:
                json.dump({"error": str(err)}, f)
            # Not a normal exit: torch's gloo teardown with a dead peer can abort (SIGABRT) at exit.
            os._exit(3)
    if results[0] is not None:
        with open(out_path, "w") as f:
            json.dump(results, f)
    torch.distributed.destroy_process_group()  # not left to interpreter exit, where gloo's teardown can abort
    return 0


if __name__ == "__main__":
    sys.exit(main())
