"""CUDA-graph decode against eager decode on the same GPU, and against the CPU reference.

Graph replay pads a batch to its bucket, so decode attention picks its split count for the
padded shape, and a preempted request's K/V are recomputed by prefill GEMMs: in bfloat16 these
round differently from eager decode, so bfloat16 tokens are compared where their greedy margins
certify them (tests/greedy_margin.py). float32 paths give identical tokens, sampled ones too.
Engines on different devices draw different random weights: the GPU engines here load the
CPU engine's (as tests/test_gpu_engine.py does)."""

import pytest
import torch

from anygpt_engine import Engine, SamplingParams
from anygpt_engine.weights import hf_state_dict
from greedy_margin import assert_greedy_agree_where_margins_allow

pytestmark = pytest.mark.gpu

PROMPTS = [[1, 5, 9, 200, 7], [1, 3], [1] + list(range(300, 340)), [1, 77, 78], [1, 9, 9, 9, 9, 10]]
# The logit bound each dtype's paths keep to the float32 reference (tests/test_gpu_engine.py).
REL_DELTA = {torch.float32: 1e-4, torch.bfloat16: 0.05}


def _float32_twin(engine):
    """A float32 eager engine on the same device with the engine's weights: the margin yardstick."""
    return Engine(engine.config, weights=hf_state_dict(engine.model, engine.config), device=engine.device,
                  dtype=torch.float32, cuda_graphs=False, max_batch_size=1)


def _check_buckets(graphed):
    assert graphed.stats().graphs > 0 and graphed.stats().graph_capture_s > 0
    used = graphed.stats().graph_buckets_used
    assert (8, 8) in used and (2, 8) in used  # the batch shrank from 5 (bucket 8) to 2 as requests ended


def test_graph_and_eager_decode_give_identical_tokens_fp32():
    params = [SamplingParams.greedy(40, stop_token_ids=()),
              SamplingParams(temperature=0.9, top_k=30, top_p=0.9, repetition_penalty=1.1, seed=4,
                             max_new_tokens=40, stop_token_ids=()),
              SamplingParams.greedy(7, stop_token_ids=()),
              SamplingParams(temperature=1.0, seed=9, max_new_tokens=33, stop_token_ids=()),
              SamplingParams.anygpt("speech", seed=3, max_new_tokens=25)]
    eager = Engine("tiny", device="cuda", dtype=torch.float32, cuda_graphs=False, max_batch_size=8)
    graphed = Engine("tiny", device="cuda", dtype=torch.float32, cuda_graphs=True, max_batch_size=8)
    assert graphed.generate(PROMPTS, params) == eager.generate(PROMPTS, params)
    _check_buckets(graphed)


def test_graph_and_eager_decode_agree_where_margins_allow_bf16():
    params = [SamplingParams.greedy(n, stop_token_ids=()) for n in (40, 40, 7, 33, 25)]
    eager = Engine("tiny", device="cuda", dtype=torch.bfloat16, cuda_graphs=False, max_batch_size=8)
    graphed = Engine("tiny", device="cuda", dtype=torch.bfloat16, cuda_graphs=True, max_batch_size=8)
    got, expected = graphed.generate(PROMPTS, params), eager.generate(PROMPTS, params)
    compared = assert_greedy_agree_where_margins_allow(got, expected, PROMPTS, _float32_twin(eager),
                                                       REL_DELTA[torch.bfloat16])
    print(f"bf16 graph vs eager: {compared} of {sum(map(len, expected))} tokens compared before a near tie")
    _check_buckets(graphed)


def test_graph_decode_matches_cpu_reference_fp32():
    cpu = Engine("tiny", device="cpu", dtype=torch.float32, max_batch_size=4)
    gpu = Engine("tiny", weights=hf_state_dict(cpu.model, cpu.config), device="cuda", dtype=torch.float32,
                 cuda_graphs=True, max_batch_size=4)
    params = SamplingParams.greedy(20, stop_token_ids=())
    got, expected = gpu.generate(PROMPTS[:4], params), cpu.generate(PROMPTS[:4], params)
    assert assert_greedy_agree_where_margins_allow(got, expected, PROMPTS[:4], cpu, REL_DELTA[torch.float32]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_engine_preempts_and_recovers(dtype):
    params = SamplingParams.greedy(30, stop_token_ids=())
    roomy = Engine("tiny", device="cuda", dtype=dtype, cuda_graphs=True, max_batch_size=8)
    tight = Engine("tiny", device="cuda", dtype=dtype, cuda_graphs=True, max_batch_size=8, num_blocks=10)
    got, expected = tight.generate(PROMPTS, params), roomy.generate(PROMPTS, params)
    assert tight.stats().preemptions > 0
    assert_greedy_agree_where_margins_allow(got, expected, PROMPTS, _float32_twin(roomy), REL_DELTA[dtype])
