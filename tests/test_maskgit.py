"""The fused MaskGIT step: reference semantics (tie rules, noise), every face against the torch
reference (Triton under TRITON_INTERPRET=1 on the CPU; CUDA and Triton on a GPU), argument
checks in Python and in the C ABI, and CUDA-graph capture."""

import pytest
import torch

from anygpt_engine import ops, tuning
from anygpt_engine.ops import maskgit
from anygpt_engine.ops._extension import extension
from conftest import HAS_GPU, poison


def _case(b=3, n=5, q=3, v=16, dtype=torch.float32, seed=0, device="cpu", ties=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, n * q, v, generator=g) * 2
    if ties:  # whole rows repeated (equal confidences) and values repeated inside rows
        logits[:, 1::2] = logits[:, :1]
        logits[..., ::3] = logits[..., :1]
    codes = torch.randint(0, v + 1, (b, n, q), generator=g)
    open_mask = torch.rand(b, n, q, generator=g) > 0.3
    lengths = torch.tensor([n, max(n - 2, 1), 1, n][:b])
    prompt = torch.tensor([1, 0, 0, 2][:b])
    counts = torch.tensor([4, 0, 2, 100][:b])
    seeds = torch.tensor([1, -5, 2**40 + 3, 7][:b])
    return [t.to(device) for t in (logits.to(dtype), codes, open_mask, lengths, prompt, counts, seeds)]


def _run(case, backend, **kw):
    logits, codes, open_mask, lengths, prompt, counts, seeds = case
    codes, open_mask = codes.clone(), open_mask.clone()
    ops.maskgit_step(logits, codes, open_mask, lengths, prompt, counts, seeds, backend=backend, **kw)
    return codes, open_mask


STEP = dict(counter=1, temperature=1 / 3, greedy=True, keep=5, level=0)


# -- the reference ------------------------------------------------------------------------------
def test_keep_count_is_upstreams_rounding():
    assert ops.keep_count(1024) == 308
    assert ops.keep_count(10) == 4  # ceil((1 - 0.7) * 10) = ceil(3.0000000000000004)


def test_keep_top_breaks_ties_by_lowest_index():
    x = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0]])
    assert ops.maskgit.keep_top(x, 4).tolist() == [[False, True, True, True, True, False, False]]
    assert ops.maskgit.keep_top(x, 1).tolist() == [[False, True] + [False] * 5]


def test_noise_is_keyed_per_item_and_pass():
    seeds = torch.tensor([3, 9, -1])
    u = ops.maskgit_uniform(seeds, 2, 6, 8)
    assert u.shape == (3, 6, 8) and u.dtype == torch.float32
    assert ((u > 0) & (u < 1)).all()
    assert torch.equal(ops.maskgit_uniform(seeds[1:2], 2, 4, 8), u[1:2, :4])  # batch and length invariant
    assert not torch.equal(ops.maskgit_uniform(seeds, 3, 6, 8), u)
    assert (u[0] != u[1]).float().mean() > 0.99
    assert abs(ops.maskgit_uniform(seeds, 0, 256, 64).mean().item() - 0.5) < 0.01


def test_confidence_ties_remask_the_lowest_positions():
    # Every row identical: equal confidence everywhere, so the first `count` positions are chosen.
    b, n, q, v = 1, 4, 2, 8
    logits = torch.randn(1, 1, v).expand(b, n * q, v).contiguous()
    codes = torch.zeros(b, n, q, dtype=torch.int64)
    open_mask = torch.ones(b, n, q, dtype=torch.bool)
    args = (torch.tensor([n]), torch.tensor([0]), torch.tensor([3]), torch.tensor([0]))
    uniform = torch.full((b, n * q, v), 0.5)
    new_codes, new_open = ops.maskgit_step_reference(logits, codes, open_mask, *args, counter=0, temperature=1.0,
                                                     greedy=True, keep=3, level=1, uniform=uniform)
    assert new_open.view(-1).tolist() == [True, True, True] + [False] * 5
    assert (new_codes.view(-1)[:3] == v).all() and (new_codes.view(-1)[3:] < v).all()


# -- the Triton face on the CPU ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_reference(dtype):
    case = _case(dtype=dtype, seed=1)
    for greedy in (True, False):
        kw = dict(STEP, greedy=greedy)
        expected = _run(case, "torch", **kw)
        got = _run(case, "triton", **kw)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), greedy


@pytest.mark.parametrize("kw", [dict(counter=0, temperature=0.0, keep=16, level=2),
                                dict(counter=7, temperature=2 / 3, keep=1, level=1, ties=True),
                                dict(counter=3, temperature=1.0, keep=6, level=0, uniform=True, ties=True)])
def test_triton_matches_reference_edge_cases(kw):
    kw = dict(kw)
    case = _case(b=4, n=6, q=3, v=24, seed=2, ties=kw.pop("ties", False))
    if kw.pop("uniform", False):
        kw["uniform"] = torch.rand(case[0].shape, generator=torch.Generator().manual_seed(3))
    kw = dict(greedy=True, **kw)
    expected = _run(case, "torch", **kw)
    got = _run(case, "triton", **kw)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_padding_positions_are_never_touched():
    case = _case(seed=4)
    logits, codes, open_mask, lengths, *_ = case
    for backend in ("torch", "triton"):
        new_codes, new_open = _run(case, backend, **STEP)
        frames = torch.arange(codes.shape[1]).view(1, -1, 1)
        padded = (frames >= lengths.view(-1, 1, 1)).expand_as(codes)
        assert torch.equal(new_codes[padded], codes[padded]) and torch.equal(new_open[padded], open_mask[padded])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("ties", [False, True])
def test_selection_across_position_blocks(device, ties):
    """The Triton selection walks an item's positions in blocks of triton_select_block: the
    count-th largest confidence, and the ties at it, are found across blocks. With ties every
    position has the same confidence, so exactly the first `count` positions are re-masked. On a
    GPU: the shipped block of 4,096 and 4,480 positions, both faces (no other test passes one
    block). On the CPU the same loop with blocks of 8 over 28 positions (the interpreter takes
    ~0.1 s a position)."""
    n, select_block, counts = (640, 4096, [4100, 2900]) if device == "cuda" else (4, 8, [19, 10])
    b, q, v = 2, 7, 16
    g = torch.Generator().manual_seed(n)
    if ties:
        logits = torch.randn(1, 1, v, generator=g).expand(b, n * q, v).contiguous()
    else:
        logits = torch.randn(b, n * q, v, generator=g) * 2
    codes = torch.randint(0, v + 1, (b, n, q), generator=g)
    open_mask = torch.ones(b, n, q, dtype=torch.bool) if ties else torch.rand(b, n, q, generator=g) > 0.3
    case = [t.to(device) for t in (logits, codes, open_mask, torch.tensor([n, n - 3]), torch.tensor([0, 1]),
                                   torch.tensor(counts), torch.tensor([5, 6]))]
    kw = dict(counter=0, temperature=0.0, greedy=True, keep=5, level=q - 1)  # re-masks only what it selects
    expected = _run(case, "torch", **kw)
    if ties:
        assert expected[1][0].view(-1).tolist() == [True] * counts[0] + [False] * (n * q - counts[0])
    with tuning.override("maskgit", triton_select_block=select_block):
        for backend in ("triton", "cuda") if device == "cuda" else ("triton",):
            got = _run(case, backend, **kw)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), backend


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_codebooks_wider_than_the_cuda_kernel_fall_back_to_triton(monkeypatch, device):
    """The CUDA step keeps a row in one warp (at most CUDA_MAX_CODEBOOK logits): wider codebooks
    dispatched to CUDA run on Triton, and an explicit backend='cuda' says why. On the CPU the
    dispatcher is made to answer 'cuda', as it does on a GPU."""
    if device == "cpu":
        monkeypatch.setattr(maskgit._backend, "choose", lambda op, dev, requested, preferred, supported: "cuda")
    case = _case(b=2, n=2, q=2, v=maskgit.CUDA_MAX_CODEBOOK * 2, seed=8, device=device)
    kw = dict(STEP, keep=600, greedy=False)
    expected = _run(case, "torch", **kw)
    got = _run(case, None, **kw)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(ValueError, match=r"logits.shape\[-1\]=2048: the CUDA maskgit_step holds a row in one warp"):
        _run(case, "cuda", **STEP)


# -- argument checks ---------------------------------------------------------------------------
def test_bad_arguments_raise_clearly():
    logits, codes, open_mask, lengths, prompt, counts, seeds = _case()
    call = dict(counter=0, temperature=0.5, greedy=True, keep=4)
    with pytest.raises(ValueError, match=r"keep=0, expected an int in \[1, 16\]"):
        ops.maskgit_step(logits, codes, open_mask, lengths, prompt, counts, seeds, **{**call, "keep": 0})
    with pytest.raises(ValueError, match=r"level=3, expected an int in \[0, 3\)"):
        ops.maskgit_step(logits, codes, open_mask, lengths, prompt, counts, seeds, level=3, **call)
    with pytest.raises(ValueError, match=r"logits.shape=\(3, 14, 16\), expected contiguous \[B, N\*Q, V\] = \[3, 15"):
        ops.maskgit_step(logits[:, :14], codes, open_mask, lengths, prompt, counts, seeds, **call)
    with pytest.raises(ValueError, match=r"codes: shape \(3, 5, 3\), dtype torch.int32"):
        ops.maskgit_step(logits, codes.int(), open_mask, lengths, prompt, counts, seeds, **call)
    with pytest.raises(ValueError, match=r"counts: shape \(2,\), dtype torch.int64: expected a contiguous int64 \[3\]"):
        ops.maskgit_step(logits, codes, open_mask, lengths, prompt, counts[:2], seeds, **call)
    with pytest.raises(ValueError, match=r"temperature=-1, expected a finite number >= 0"):
        ops.maskgit_step(logits, codes, open_mask, lengths, prompt, counts, seeds, **{**call, "temperature": -1})
    with pytest.raises(TypeError, match=r"logits.dtype=torch.float64"):
        ops.maskgit_step(logits.double(), codes, open_mask, lengths, prompt, counts, seeds, **call)
    with pytest.raises(ValueError, match="uniform: expected a float32 tensor of shape"):
        ops.maskgit_step(logits, codes, open_mask, lengths, prompt, counts, seeds, uniform=logits[:1], **call)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ops.maskgit_step(logits, codes, open_mask, lengths, prompt, counts, seeds, backend="cuda", **call)


def _abi_call(**overrides):
    logits, codes, open_mask, lengths, prompt, counts, seeds = _case()
    conf, done = torch.empty(3, 15), torch.zeros(3, dtype=torch.int32)
    args = dict(codes=codes.data_ptr(), open_mask=open_mask.data_ptr(), confidence=conf.data_ptr(),
                done=done.data_ptr(), logits=logits.data_ptr(), logits_dtype=0, uniform=0, lengths=lengths.data_ptr(),
                prompt_lengths=prompt.data_ptr(), counts=counts.data_ptr(), seeds=seeds.data_ptr(), batch=3,
                frames=5, levels=3, codebook_size=16, keep=4, level=0, counter=0, divisor=1.0, greedy=True,
                threads=256, rows_per_warp=4, stream=0)
    args.update(overrides)
    extension().maskgit_step_cuda(**args)


def test_c_abi_checks_its_arguments():
    if not extension().built_with_cuda:
        with pytest.raises(RuntimeError, match="built without CUDA"):
            _abi_call()
        return
    with pytest.raises(ValueError, match=r"codebook_size=2048, expected 1..1024"):
        _abi_call(codebook_size=2048)
    with pytest.raises(ValueError, match=r"keep=17, expected 1..codebook_size=16"):
        _abi_call(keep=17)
    with pytest.raises(ValueError, match=r"threads=48"):
        _abi_call(threads=48)
    with pytest.raises(ValueError, match=r"level=3, expected 0 <= level < levels"):
        _abi_call(level=3)
    with pytest.raises(ValueError, match="non-null"):
        _abi_call(codes=0)
    with pytest.raises(TypeError, match="dtype code 9"):
        _abi_call(logits_dtype=9)


@pytest.mark.skipif(HAS_GPU, reason="checks the error raised on a machine without a GPU")
def test_cuda_call_without_gpu_raises_clear_error():
    if extension().built_with_cuda:
        with pytest.raises(RuntimeError, match="no usable CUDA device"):
            _abi_call()


# -- GPU ---------------------------------------------------------------------------------------
def _gpu_case(dtype, b=3, n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, v = 7, 1024
    logits = (torch.randn(b, n * q, v, generator=g) * 3).to(dtype).cuda()
    codes = torch.randint(0, v + 1, (b, n, q), generator=g).cuda()
    open_mask = (torch.rand(b, n, q, generator=g) > 0.5).cuda()
    lengths = torch.tensor([n, n // 2, 1][:b]).cuda()
    prompt = torch.tensor([n // 5, 0, 0][:b]).cuda()
    counts = torch.tensor([n * 5 // 6, n // 4, 1][:b]).cuda()
    seeds = torch.tensor([1, 2, 3][:b]).cuda()
    return [logits, codes, open_mask, lengths, prompt, counts, seeds]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("greedy", [True, False])
def test_faces_match_reference_gpu(backend, dtype, greedy):
    """Bit-identical ids and masks: the float parts are evaluated in float64 and rounded once,
    so an ulp difference between libraries changes a float32 value with probability ~2^-28."""
    case = _gpu_case(dtype)
    for counter, temperature in ((0, 0.0), (1, 1 / 3), (2, 2 / 3)):
        kw = dict(counter=counter, temperature=temperature, greedy=greedy, keep=308, level=0)
        expected = _run(case, "torch", **kw)
        got = _run(case, backend, **kw)
        torch.cuda.synchronize()
        assert torch.equal(got[0], expected[0]), counter
        assert torch.equal(got[1], expected[1]), counter


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_step_replays_in_a_cuda_graph(backend):
    logits, codes, open_mask, lengths, prompt, counts, seeds = _gpu_case(torch.bfloat16, seed=1)
    kw = dict(counter=1, temperature=1 / 3, greedy=True, keep=308, level=0, backend=backend)
    expected = _run([logits, codes, open_mask, lengths, prompt, counts, seeds], backend, **kw)
    work_codes, work_open = codes.clone(), open_mask.clone()
    ops.maskgit_step(logits, work_codes, work_open, lengths, prompt, counts, seeds, **kw)  # warm up / compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.maskgit_step(logits, work_codes, work_open, lengths, prompt, counts, seeds, **kw)
    for _ in range(2):
        work_codes.copy_(codes)
        work_open.copy_(open_mask)
        poison(torch.empty_like(logits))  # churn the allocator between replays
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(work_codes, expected[0]) and torch.equal(work_open, expected[1])
