"""CUDA-graph decode (runtime/graphs.py) on the CPU: buckets, padding and static buffers, with the
CUDA graph replaced by a recorded eager call (tests/graph_stand_in.py). Only the capture itself
is left to the GPU tests (tests/test_gpu_runtime.py)."""

import pytest
import torch

from anygpt_engine import Engine, ModelConfig, SamplingParams, Vocabulary
from anygpt_engine.runtime.graphs import DecodeInputs, bucket_for, buckets
from anygpt_engine.vocab import ModalitySpan
from graph_stand_in import _Graph, patch_cuda, stand_in_graphs


def test_buckets_are_powers_of_two_up_to_the_limit():
    assert buckets(1) == [1]
    assert buckets(5) == [1, 2, 4, 8]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(256, start=8) == [8, 16, 32, 64, 128, 256]
    assert buckets(300, start=8)[-1] == 512
    sizes = buckets(32)
    assert [bucket_for(sizes, n) for n in (1, 2, 3, 5, 16, 17, 32)] == [1, 2, 4, 8, 16, 32, 32]
    with pytest.raises(ValueError, match="33 exceeds the largest bucket 32"):
        bucket_for(sizes, 33)


def _host(tokens, width, first_block):
    n = len(tokens)
    return DecodeInputs(tokens=torch.tensor(tokens), positions=torch.arange(n) + 40,
                        slot_mapping=torch.arange(n) + 1000,
                        block_tables=torch.arange(n * width).view(n, width) + first_block,
                        slots=torch.arange(n) + 3, head_rows=torch.tensor([100, 50 + n]))


def test_fill_pads_every_row_and_column_past_the_batch():
    """A bucket's buffers keep the previous step's values: filling a smaller batch must reset
    every padding row to token 0 at position 0, cache slot 0 (the scratch block), an all-zero
    block table and the scratch sampling slot, and clear table columns past the batch's width."""
    scratch = 9
    inputs = DecodeInputs.empty(4, 6, scratch, 640, "cpu")
    assert inputs.slots.tolist() == [scratch] * 4 and inputs.head_rows.tolist() == [0, 640]
    inputs.fill(_host([5, 6, 7, 8], 6, 1), scratch)  # a full bucket
    inputs.fill(_host([11, 12], 3, 200), scratch)  # then a smaller, narrower batch
    assert inputs.tokens.tolist() == [11, 12, 0, 0]
    assert inputs.positions.tolist() == [40, 41, 0, 0]
    assert inputs.slot_mapping.tolist() == [1000, 1001, 0, 0]
    assert inputs.block_tables.tolist() == [[200, 201, 202, 0, 0, 0], [203, 204, 205, 0, 0, 0]] + [[0] * 6] * 2
    assert inputs.slots.tolist() == [3, 4, scratch, scratch]
    assert inputs.head_rows.tolist() == [100, 52]


def test_graph_replay_gives_eager_tokens(monkeypatch):
    """Requests end at different steps, so the batch shrinks through the buckets (8 -> 4 -> 2 -> 1)
    and a bucket is reused by a smaller batch than it last held; contexts grow past a width
    bucket (8 blocks of 4 tokens). Padding rows decode token 0 into the scratch block and sample
    into the scratch slot: every request's tokens equal the eager engine's, sampled ones included."""
    # 16 blocks of 4 tokens a sequence (widths 8 and 16); a small vocabulary keeps the sampler cheap.
    config = ModelConfig.preset("tiny").replace(max_seq_len=64, vocab_size=640, name="tiny-640")
    engine = dict(device="cpu", max_batch_size=8, block_size=4,
                  vocab=Vocabulary(640, {"speech": ModalitySpan(400, 200, 600, 601)}))
    # The longest request decodes inside a speech span: alone at the end, its steps read only the
    # span's LM head rows (the rows are a graph input too).
    prompts = [[1, 5, 9, 200, 7], [1, 3], [1] + list(range(300, 320)) + [600], [1, 77, 78], [1, 9, 9, 9, 9, 10]]
    params = [SamplingParams.greedy(3, stop_token_ids=()),
              SamplingParams(temperature=0.9, top_k=30, top_p=0.9, repetition_penalty=1.1, seed=4,
                             max_new_tokens=14, stop_token_ids=()),
              SamplingParams.greedy(16, stop_token_ids=()),
              SamplingParams(temperature=1.0, seed=9, max_new_tokens=9, stop_token_ids=()),
              SamplingParams.anygpt("speech", seed=3, max_new_tokens=5)]
    eager = Engine(config, **engine)
    expected = eager.generate(prompts, params)
    graphed = Engine(config, **engine)
    patch_cuda(monkeypatch.setattr)
    _Graph.captures.clear()
    stand_in_graphs(graphed)  # and no capture reads a device value on the host
    assert len(graphed.graphs) == 4 * 2
    # each on a stream of the engine's device (torch's default capture stream may be another device's)
    assert [options["stream"].device for options in _Graph.captures] == [torch.device("cpu")] * 8
    assert graphed.generate(prompts, params) == expected
    assert graphed.head_rows_read == eager.head_rows_read < 640 * sum(len(o) - 1 for o in expected)
    used = graphed.graphs.used
    assert {(8, 8), (4, 8), (2, 8)} <= used and (1, 16) in used  # 22 + 16 tokens outgrow 8 blocks
