"""CUDA-graph decode against the eager path on the same GPU: identical tokens."""

import pytest
import torch

from anygpt_engine import Engine, SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = [[1, 5, 9, 200, 7], [1, 3], [1] + list(range(300, 340)), [1, 77, 78], [1, 9, 9, 9, 9, 10]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_and_eager_decode_give_identical_tokens(dtype):
    params = [SamplingParams.greedy(40, stop_token_ids=()),
              SamplingParams(temperature=0.9, top_k=30, top_p=0.9, repetition_penalty=1.1, seed=4,
                             max_new_tokens=40, stop_token_ids=()),
              SamplingParams.greedy(7, stop_token_ids=()),
              SamplingParams(temperature=1.0, seed=9, max_new_tokens=33, stop_token_ids=()),
              SamplingParams.anygpt("speech", seed=3, max_new_tokens=25)]
    eager = Engine("tiny", device="cuda", dtype=dtype, cuda_graphs=False, max_batch_size=8)
    graphed = Engine("tiny", device="cuda", dtype=dtype, cuda_graphs=True, max_batch_size=8)
    assert graphed.stats().graphs > 0 and graphed.stats().graph_capture_s > 0
    assert graphed.generate(PROMPTS, params) == eager.generate(PROMPTS, params)
    used = graphed.stats().graph_buckets_used
    assert (8, 8) in used and (2, 8) in used  # the batch shrank from 5 (bucket 8) to 2 as requests ended


def test_graph_decode_matches_cpu_reference_fp32():
    cpu = Engine("tiny", device="cpu", dtype=torch.float32)
    gpu = Engine("tiny", device="cuda", dtype=torch.float32, cuda_graphs=True, max_batch_size=4)
    params = SamplingParams.greedy(20, stop_token_ids=())
    assert gpu.generate(PROMPTS[:4], params) == cpu.generate(PROMPTS[:4], params)


def test_graph_engine_preempts_and_recovers():
    params = SamplingParams.greedy(30, stop_token_ids=())
    roomy = Engine("tiny", device="cuda", cuda_graphs=True, max_batch_size=8)
    tight = Engine("tiny", device="cuda", cuda_graphs=True, max_batch_size=8, num_blocks=10)
    assert tight.generate(PROMPTS, params) == roomy.generate(PROMPTS, params)
    assert tight.stats().preemptions > 0
