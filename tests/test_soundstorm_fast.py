"""SoundStorm's fast path: the fused ops (Triton under TRITON_INTERPRET=1 on the CPU) against their
torch references, forward_fast against the float32 reference forward, frame-bucket padding,
generate on the fast path, and on a GPU: bf16 logits within the documented tolerance, graph
replay against eager, and the margin rule for ids.

The bf16 rules (checked on the CPU with the torch faces, asserted on the GPU):
  logits: rms(fast - ref) <= 0.03 * rms(ref) and max|fast - ref| <= 0.2 * max(1, rms(ref)) over
    valid positions (AnyGPT's shape, random weights, measured on the CPU: rms 0.0125, max 0.064
    at rms(ref) 1.0);
  ids (the margin rule): along the reference's trajectory (teacher forcing: both networks see the
    same state at every pass, the same noise), with delta = the observed max |fast - ref| of that
    pass, the fast path's id at a position equals the reference's wherever the reference's
    decision has margin: argmax passes: top1 - top2 > 2 delta; sampled passes (score
    s = x / T + g over the kept logits): the chosen id stays kept under any +-delta change and its
    score beats every id that could be kept by more than 2 delta / T. A re-mask decision must
    agree where the position's id has margin and its confidence (1 - p, p perturbed by at most
    p (e^{2 delta} - 1 + 2 m), m = the kept-softmax mass within 2 delta of the keep boundary) is
    on the same side of the c-th largest for every admissible perturbation of the others.
"""

import math

import pytest
import torch

from anygpt_engine import SoundStorm, SoundStormConfig, ops
from anygpt_engine.ops import soundstorm as S
from conftest import HAS_GPU, poison
from test_soundstorm import SMALL, _inputs, _item, upstream_model

DEV = "cuda" if HAS_GPU else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2 * 2.0**-10, torch.bfloat16: 2 * 2.0**-7}
MEDIUM = SoundStormConfig(dim=256, depth=3, heads=4, dim_head=64, conv_kernel_size=31, num_quantizers=7,
                          codebook_size=1024)


def _close(actual, expected, dtype):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=TOL[dtype], atol=TOL[dtype])


def _rand(shape, dtype, g, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=g) * scale + shift).to(dtype)


@pytest.fixture(scope="module")
def model():
    return SoundStorm.from_pretrained(upstream_model(seed=7).state_dict(), SMALL)


# -- the fused ops: Triton (interpreter on the CPU) against the torch reference -------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_code_embedding_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    b, n, q, v, d = 2, 5, 3, 16, 40
    codes = torch.randint(0, v + 1, (b, n, q), generator=g)
    codes[0, 0] = v  # the mask id of every level
    semantic = torch.randint(0, v, (b, n), generator=g)
    table, sem_table = _rand((q * (v + 1), d), dtype, g), _rand((v, d), dtype, g)
    expected = S.code_embedding(codes, semantic, table, sem_table, backend="torch")
    # The reference is the network's embedding sum, rounded once.
    offsets = torch.arange(q) * (v + 1)
    network = (torch.nn.functional.embedding(codes + offsets, table.float()).sum(2)
               + torch.nn.functional.embedding(semantic, sem_table.float()))
    _close(expected, network, dtype)
    out = poison(torch.empty(b, n, d, dtype=dtype))
    got = S.code_embedding(codes, semantic, table, sem_table, out=out, backend="triton")
    assert got is out
    assert torch.equal(got, expected)  # same float32 additions in the same order


NORM_MODES = {
    "pre": dict(y=True, alpha=0.5, post=False, norm=True),  # x += 0.5 FF(x); h = LN(x)
    "add": dict(y=True, alpha=1.0, post=False, norm=True),
    "post_then_pre": dict(y=True, alpha=0.5, post=True, norm=True),  # block end + next block's FF1 norm
    "post_only": dict(y=True, alpha=0.5, post=True, norm=False),  # the last block
    "norm_only": dict(y=False, alpha=1.0, post=False, norm=True),  # the heads' LN, the first FF1 norm
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", list(NORM_MODES))
def test_add_layer_norm_matches_reference(dtype, mode):
    m = NORM_MODES[mode]
    g = torch.Generator().manual_seed(2)
    rows, d = 6, 200
    x, y = _rand((rows, d), dtype, g, 2.0, 0.3), _rand((rows, d), dtype, g)
    norms = [(torch.rand(d, generator=g) + 0.5, torch.randn(d, generator=g) * 0.1) for _ in range(2)]
    kw = dict(y=y if m["y"] else None, alpha=m["alpha"], post_norm=norms[0] if m["post"] else None,
              norm=norms[1] if m["norm"] else None, eps=1e-5)
    res_ref, res_tri = x.clone(), x.clone()
    expected = S.add_layer_norm(res_ref, backend="torch", **kw)
    got = S.add_layer_norm(res_tri, out=poison(torch.empty_like(x)) if m["norm"] else None, backend="triton", **kw)
    exp_res, exp_out = S.add_layer_norm_reference(x, **kw)
    assert torch.equal(res_ref, exp_res)
    if not m["post"]:  # a single rounding of x + alpha * y: exact in both faces
        assert torch.equal(res_tri, res_ref)
    _close(res_tri, res_ref, dtype)
    if m["norm"]:
        assert torch.equal(expected, exp_out)
        _close(got, expected, dtype)
    else:
        assert got is None and expected is None
    if not m["y"] and not m["post"]:
        assert torch.equal(res_tri, x)  # the residual is only read


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [5, 4])
def test_conformer_conv_matches_reference(dtype, k):
    """Odd and even taps (upstream pads k//2 left, k//2 - 1 right for even k), padded frames,
    an empty item, a strided [K, C]-stored weight."""
    g = torch.Generator().manual_seed(3)
    b, n, c = 3, 9, 24
    u = _rand((b, n, 2 * c), dtype, g, 1.5)
    lengths = torch.tensor([9, 4, 0])
    weight = torch.randn(k, c, generator=g).t()  # [C, K] view of [K, C] storage
    bias, gamma = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    expected = S.conformer_conv(u, lengths, weight, bias, gamma, eps=1e-6, backend="torch")
    got = S.conformer_conv(u, lengths, weight, bias, gamma, eps=1e-6, out=poison(torch.empty(b, n, c, dtype=dtype)),
                           backend="triton")
    _close(got, expected, dtype)
    assert (got[1, 4:] == 0).all() and (got[2] == 0).all()
    if dtype == torch.float32:  # the reference against the network's conv module (same weights)
        block = SoundStorm(SoundStormConfig(dim=8, depth=1, heads=1, dim_head=8, conv_kernel_size=k,
                                            conv_expansion_factor=3)).layers[0]
        with torch.no_grad():
            block.depthwise.weight.copy_(weight.unsqueeze(1))
            block.depthwise.bias.copy_(bias)
            block.chan_norm.copy_(gamma)
        h = (u[..., :c] * u[..., c:].sigmoid()).transpose(1, 2)
        keep = (torch.arange(n) < lengths[:, None]).unsqueeze(1)
        h = h.masked_fill(~keep, 0.0)
        h = block.depthwise(torch.nn.functional.pad(h, (k // 2, k // 2 - (k + 1) % 2))).masked_fill(~keep, 0.0)
        h = h * h.sigmoid()
        var, mean = torch.var(h, dim=1, unbiased=False, keepdim=True), h.mean(dim=1, keepdim=True)
        network = ((h - mean) * var.clamp(min=1e-6).rsqrt() * gamma.view(1, -1, 1)).transpose(1, 2)
        torch.testing.assert_close(expected, network.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16 tl.dot is wrong in the interpreter
def test_grouped_linear_matches_reference(dtype):
    g = torch.Generator().manual_seed(4)
    m, q, d, v = 70, 3, 48, 80
    x = _rand((m, q, d + 8), dtype, g)[..., :d]  # strided rows
    weight, bias = _rand((q, d, v), dtype, g, d ** -0.5), torch.randn(q, v, generator=g)
    expected = S.grouped_linear_reference(x, weight, bias)
    torch.testing.assert_close(expected, torch.stack([x[:, i].float() @ weight[i].float() + bias[i]
                                                      for i in range(q)], dim=1), rtol=1e-5, atol=1e-5)
    # float32 logits written into a [B, N*Q, V] layout, as forward_fast does
    out = poison(torch.empty(m, q, v))
    got = S.grouped_linear(x, weight, bias, out=out, backend="triton")
    assert got is out
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    same = S.grouped_linear(x, weight, bias, backend="triton")
    assert same.dtype == dtype
    _close(same, expected, dtype)


def test_ops_reject_bad_arguments_clearly():
    x = torch.randn(4, 16)
    w, b = torch.ones(16), torch.zeros(16)
    with pytest.raises(ValueError, match="needs at least one of y, post_norm and norm"):
        S.add_layer_norm(x)
    with pytest.raises(ValueError, match=r"norm weight.shape=\(8,\), expected contiguous \(16,\)"):
        S.add_layer_norm(x, norm=(torch.ones(8), b))
    with pytest.raises(TypeError, match=r"y.dtype=torch.float16, expected one of \['torch.float32'\]"):
        S.add_layer_norm(x, x.half(), norm=(w, b))
    with pytest.raises(ValueError, match="residual: shape .* expected a contiguous"):
        S.add_layer_norm(x.t(), norm=(torch.ones(4), torch.zeros(4)))
    with pytest.raises(ValueError, match=r"semantic.shape=\(2, 4\), expected \(2, 3\) like codes"):
        S.code_embedding(torch.zeros(2, 3, 2, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long),
                         torch.zeros(10, 4), torch.zeros(5, 4))
    with pytest.raises(TypeError, match=r"codes.dtype=torch.int32"):
        S.code_embedding(torch.zeros(2, 3, 2, dtype=torch.int32), torch.zeros(2, 3, dtype=torch.long),
                         torch.zeros(10, 4), torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"weight.shape=\(5, 3\), expected \[4, K\]"):
        S.conformer_conv(torch.zeros(1, 2, 8), torch.tensor([2]), torch.zeros(5, 3), torch.zeros(4), torch.ones(4),
                         eps=1e-6)
    with pytest.raises(ValueError, match=r"lengths.shape=\(2,\), expected \(1,\)"):
        S.conformer_conv(torch.zeros(1, 2, 8), torch.tensor([2, 2]), torch.zeros(4, 3), torch.zeros(4), torch.ones(4),
                         eps=1e-6)
    with pytest.raises(ValueError, match=r"weight.shape=\(3, 5, 4\), expected contiguous \[3, 6, V\]"):
        S.grouped_linear(torch.zeros(2, 3, 6), torch.zeros(3, 5, 4), torch.zeros(3, 4))
    with pytest.raises(TypeError, match=r"out_dtype=torch.float16, expected torch.float32"):
        S.grouped_linear(torch.zeros(2, 3, 6), torch.zeros(3, 6, 4), torch.zeros(3, 4), out_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"backend='cuda': grouped_linear has only \('torch', 'triton'\)"):
        S.grouped_linear(torch.zeros(2, 3, 6), torch.zeros(3, 6, 4), torch.zeros(3, 4), backend="cuda")


# -- forward_fast on the CPU ----------------------------------------------------------------------
def _valid(lengths, n, q):
    return (torch.arange(n) < lengths.cpu()[:, None]).repeat_interleave(q, dim=1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_fast_float32_equals_reference(model, backend):
    """With fast_dtype float32 the fast path computes the reference's math (other op order):
    every kernel, the rope/attention ops and the wiring, to float32 tolerance."""
    codes, semantic = _inputs(SMALL, 3, 11)
    lengths = torch.tensor([11, 7, 1])
    model.fast_dtype = torch.float32
    try:
        with torch.no_grad():
            expected = model(codes, semantic, lengths)
        out = poison(torch.empty(3, 11 * SMALL.num_quantizers, SMALL.codebook_size))
        got = model.forward_fast(codes, semantic, lengths, out=out, backend=backend)
    finally:
        model.fast_dtype = torch.bfloat16
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float32
    valid = _valid(lengths, 11, SMALL.num_quantizers)
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)


def _bf16_rule(fast, ref):
    """The documented bf16 logit tolerance (module docstring): (ok, rms err, max err, rms ref)."""
    err = (fast.float() - ref.float()).abs()
    rms_ref = ref.float().pow(2).mean().sqrt().item()
    rms_err, max_err = err.pow(2).mean().sqrt().item(), err.max().item()
    return rms_err <= 0.03 * rms_ref and max_err <= 0.2 * max(1.0, rms_ref), rms_err, max_err, rms_ref


def test_forward_fast_bf16_within_tolerance_cpu(model):
    codes, semantic = _inputs(SMALL, 3, 11)
    lengths = torch.tensor([11, 7, 1])
    with torch.no_grad():
        expected = model(codes, semantic, lengths)
    got = model.forward_fast(codes, semantic, lengths, backend="torch")  # bf16 weights and activations
    valid = _valid(lengths, 11, SMALL.num_quantizers)
    ok, *numbers = _bf16_rule(got[valid], expected[valid])
    assert ok, numbers
    assert numbers[1] > 1e-4  # it really ran in bf16


def test_fast_weights_follow_parameter_changes(model):
    codes, semantic = _inputs(SMALL, 1, 6)
    clone = SoundStorm.from_pretrained(upstream_model(seed=7).state_dict(), SMALL)
    clone.fast_dtype = torch.float32
    before = clone.forward_fast(codes, semantic)
    assert clone.forward_fast(codes, semantic).equal(before)  # cached, same numbers
    with torch.no_grad():
        clone.out_bias.add_(1.0)
    after = clone.forward_fast(codes, semantic)
    torch.testing.assert_close(after, before + 1.0, rtol=1e-5, atol=1e-5)


# -- frame buckets and generate on the fast path ------------------------------------------------
def test_bucket_padding_is_exact_on_reference_path(model):
    """Padding frames (masked by lengths) never change a valid frame's logits beyond float32
    rounding, and never change generate's codes: a bucket serves every shorter length."""
    codes, semantic = _inputs(SMALL, 2, 9)
    lengths = torch.tensor([9, 5])
    pad_codes, pad_sem = _inputs(SMALL, 2, 16, seed=8)
    pad_codes[:, :9], pad_sem[:, :9] = codes, semantic
    with torch.no_grad():
        alone = model(codes, semantic, lengths)
        padded = model(pad_codes, pad_sem, lengths)
    valid = _valid(lengths, 9, SMALL.num_quantizers)
    torch.testing.assert_close(padded[:, :9 * SMALL.num_quantizers][valid], alone[valid], rtol=1e-5, atol=1e-5)
    items = [_item(60 + i, t, p) for i, (t, p) in enumerate([(9, 3), (1, 0), (14, 6)])]
    semantic_l = [s for s, _, _ in items]
    prompt = ([ps for _, ps, _ in items], [pa for _, _, pa in items])
    for greedy in (True, False):
        expected = model.generate(semantic_l, prompt, greedy=greedy, seeds=[1, 2, 3])
        for bucket in (8, 32):
            got = model.generate(semantic_l, prompt, greedy=greedy, seeds=[1, 2, 3], frame_bucket=bucket)
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), (greedy, bucket)


@pytest.mark.parametrize("greedy", [True, False])
def test_generate_fast_float32_equals_reference(model, greedy):
    """generate on the fast path (eager, CPU, float32 fast dtype, default bucket of 128 frames and
    small buckets) gives the reference path's codes: ragged batch, prompts, injected noise."""
    items = [_item(70 + i, t, p) for i, (t, p) in enumerate([(9, 3), (1, 0), (14, 6), (5, 1)])]
    semantic = [s for s, _, _ in items]
    prompt = ([ps for _, ps, _ in items], [pa for _, _, pa in items])
    expected = model.generate(semantic, prompt, greedy=greedy, seeds=[4, 3, 2, 1])
    model.fast_dtype = torch.float32
    try:
        for bucket in (None, 8):
            got = model.generate(semantic, prompt, greedy=greedy, seeds=[4, 3, 2, 1], fast=True, frame_bucket=bucket)
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), bucket
        # injected draws [B, N_max*Q, V] are widened to the bucket
        n_max = max(len(s) + len(ps) for s, ps, _ in items)

        def noise(counter):
            return ops.maskgit_uniform(torch.tensor([4, 3, 2, 1]), counter, n_max * SMALL.num_quantizers,
                                       SMALL.codebook_size)

        got = model.generate(semantic, prompt, greedy=greedy, noise=noise, fast=True, frame_bucket=16)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    finally:
        model.fast_dtype = torch.bfloat16


def test_graph_plumbing_with_a_stand_in_graph(monkeypatch):
    """generate's graph path on the CPU with the CUDA graph replaced by a recorded eager call:
    static buffers, lazy capture, a bucket reused by shorter and longer batches (its buffers
    holding the previous call's state), new buckets, and invalidation on a weight change. Only
    the capture itself is left to the GPU tests."""
    from anygpt_engine.models import soundstorm as module

    class Recorded:
        def __init__(self, fn):
            self.replay = fn

    def capture(graph, net):
        if graph.graph is None:
            net._fast_weights().aux(*graph.semantic.shape)
            graph.graph = Recorded(lambda: net.forward_fast(graph.codes, graph.semantic, graph.lengths,
                                                            out=graph.logits))

    monkeypatch.setattr(module._GraphPass, "capture", capture)
    monkeypatch.setattr(SoundStorm, "_paths", lambda self, device, fast, graphs, bucket: (fast, fast, bucket or 8))
    net = SoundStorm.from_pretrained(upstream_model(seed=7).state_dict(), SMALL)
    net.fast_dtype = torch.float32

    def check(lengths, seed, greedy=True):
        items = [_item(seed + i, t, p) for i, (t, p) in enumerate(lengths)]
        semantic = [s for s, _, _ in items]
        prompt = ([ps for _, ps, _ in items], [pa for _, _, pa in items])
        seeds = list(range(seed, seed + len(items)))
        expected = net.generate(semantic, prompt, greedy=greedy, seeds=seeds, fast=False)
        got = net.generate(semantic, prompt, greedy=greedy, seeds=seeds, fast=True)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), (lengths, greedy)

    check([(15, 3), (4, 0), (9, 2)], 80)  # 18 frames: bucket 24
    assert net.captured_graphs == [(3, 24)]
    check([(2, 1), (17, 0), (5, 5)], 90, greedy=False)  # same bucket, stale buffers
    check([(3, 0), (1, 0), (1, 0)], 95)  # shorter: bucket 8
    check([(30, 4)], 100)
    assert net.captured_graphs == [(1, 40), (3, 8), (3, 24)]
    with torch.no_grad():
        net.heads.bias.add_(0.25)
    check([(6, 2)], 110)
    assert net.captured_graphs == [(1, 8)]  # the old graphs held the old weights


def test_graphs_need_varlen_attention_on_a_kernel(model, monkeypatch):
    """The torch reference of varlen attention reads run lengths on the host, which a capture
    cannot hold: forcing it (ANYGPT_BACKEND) leaves a CUDA model's generate eager."""
    cuda = torch.device("cuda")
    assert model._paths(cuda, None, None, None) == (True, True, model.frame_bucket)
    monkeypatch.setenv("ANYGPT_BACKEND", "varlen_attention=torch")
    assert model._paths(cuda, None, None, None) == (True, False, model.frame_bucket)
    with pytest.raises(ValueError, match="varlen attention on a kernel"):
        model._paths(cuda, None, True, None)


def test_capture_runs_on_the_models_device_thread_local(monkeypatch):
    """A server captures SoundStorm while its engine thread decodes: the capture must be
    thread_local (a global one turns the other thread's allocations into errors) and on a stream
    of the model's own device, never reading device values on the host."""
    from anygpt_engine.models import soundstorm as module
    from graph_stand_in import _Graph, patch_cuda

    net = SoundStorm(SMALL)
    pass_ = module._GraphPass(net, 1, 16, torch.device("cpu"))
    monkeypatch.setattr(net, "forward_fast", lambda codes, semantic, lengths, out: out.copy_(out.exp()))
    patch_cuda(monkeypatch.setattr)
    _Graph.captures.clear()
    pass_.capture(net)
    [options] = _Graph.captures
    assert options["capture_error_mode"] == "thread_local" and options["stream"].device == torch.device("cpu")
    assert pass_.graph is not None


def test_generate_path_arguments(model):
    with pytest.raises(ValueError, match=r"cuda_graphs=True needs fast=True, the model on a CUDA device"):
        model.generate([[1, 2]], cuda_graphs=True, fast=True)
    with pytest.raises(ValueError, match=r"frame_bucket=0, expected a positive int"):
        model.generate([[1, 2]], frame_bucket=0)
    with pytest.raises(TypeError, match=r"fast='yes', expected None, True or False"):
        model.generate([[1, 2]], fast="yes")
    with pytest.raises(RuntimeError, match="capture_graphs needs the model on a CUDA device"):
        model.capture_graphs()
    model.fast_dtype = torch.int8
    try:
        with pytest.raises(ValueError, match="fast_dtype=torch.int8"):
            model.generate([[1, 2]], fast=True)
    finally:
        model.fast_dtype = torch.bfloat16
    assert model.captured_graphs == []


# -- the margin rule -----------------------------------------------------------------------------
def decisions_where_margins_allow(model, semantic, prompt_sem, prompt_ac, seed, steps=3, greedy=True,
                                  fast_forward=None):
    """Teacher-forced comparison along the reference's trajectory (module docstring). Asserts the
    rule at every pass; returns (decisions with margin, decisions) over ids and re-masks."""
    c = model.config
    q, v = c.num_quantizers, c.codebook_size
    dev = model.code_embed.weight.device
    p = len(prompt_sem)
    n = p + len(semantic)
    fast_forward = fast_forward or model.forward_fast
    sem = torch.cat([prompt_sem, semantic]).view(1, n).to(dev)
    codes = torch.full((1, n, q), c.mask_id, dtype=torch.int64, device=dev)
    codes[0, :p] = prompt_ac.to(dev)
    lengths, prompt_t, seeds = (torch.tensor([x], device=dev) for x in (n, p, seed))
    frames = torch.arange(n, device=dev).view(1, n, 1)
    open_mask = (frames >= p).expand(1, n, q).contiguous()
    counts = (torch.cos(torch.linspace(0.0, 1.0, steps + 1) * math.pi / 2) * n).long()
    keep = ops.keep_count(v)
    robust_total = total = 0
    passes = [(i, int(counts[i]), i / steps, 0) for i in range(steps + 1)]
    passes += [(steps + level, 0, 0.0, level) for level in range(1, q)]
    for counter, count, temperature, level in passes:
        if level:
            open_mask = (frames < n) & (torch.arange(q, device=dev).view(1, 1, q) >= level)
        with torch.no_grad():
            x_ref = model(codes, sem, lengths)
            x_fast = fast_forward(codes, sem, lengths)
        ok, *numbers = _bf16_rule(x_fast, x_ref)  # delta itself is held to the logit tolerance
        assert ok, (counter, numbers)
        delta = numbers[1]
        sampled = count > 0 or not greedy
        count_t = torch.tensor([count], device=dev)

        def ids_of(x):  # the step's ids everywhere (count 0: no re-mask; greedy=False keeps sampling)
            work, everywhere = codes.clone(), torch.ones_like(open_mask)
            ops.maskgit_step(x, work, everywhere, lengths, prompt_t, torch.zeros_like(count_t), seeds,
                             counter=counter, temperature=temperature, greedy=not sampled, keep=keep, level=q - 1)
            return work.view(-1)

        ids_ref, ids_fast = ids_of(x_ref), ids_of(x_fast)
        x = x_ref[0].double()
        top = x.topk(min(keep + 1, v), dim=-1).values
        if sampled:
            divisor = max(temperature, 1e-10)
            u = ops.maskgit_uniform(seeds, counter, n * q, v)[0].double()
            score = x / divisor - torch.log(-torch.log(u + 1e-10) + 1e-10)
            best = ids_ref.view(-1, 1)
            x_best = x.gather(1, best)
            stays_kept = (x > x_best - 2 * delta).sum(1, keepdim=True) <= keep  # itself included
            could_be_kept = x >= top[:, keep - 1:keep] - 2 * delta
            rivals = score.masked_fill(~could_be_kept, -math.inf).scatter(1, best, -math.inf).amax(1, keepdim=True)
            robust_id = (stays_kept & (score.gather(1, best) - rivals > 2 * delta / divisor)).view(-1)
        else:
            robust_id = top[:, 0] - top[:, 1] > 2 * delta
        assert torch.equal(ids_fast[robust_id], ids_ref[robust_id]), (counter, delta)
        robust_total += int(robust_id.sum())
        total += robust_id.numel()

        new_ref, open_ref = codes.clone(), open_mask.clone()
        ops.maskgit_step(x_ref, new_ref, open_ref, lengths, prompt_t, count_t, seeds, counter=counter,
                         temperature=temperature, greedy=greedy, keep=keep, level=level)
        new_fast, open_fast = codes.clone(), open_mask.clone()
        ops.maskgit_step(x_fast, new_fast, open_fast, lengths, prompt_t, count_t, seeds, counter=counter,
                         temperature=temperature, greedy=greedy, keep=keep, level=level)
        robust = robust_id.clone()
        if count > 0:
            kept = ops.maskgit.keep_top(x_ref[0], keep)  # exactly the step's kept set (ties to the lowest id)
            e = torch.where(kept, torch.exp(x - top[:, :1]), 0.0)
            z = e.sum(1)
            prob = e.gather(1, ids_ref.view(-1, 1)).squeeze(1) / z
            near = (x - top[:, keep - 1:keep]).abs() <= 2 * delta
            boundary = torch.where(near, torch.exp(x + delta - top[:, :1]), 0.0).sum(1) / z
            eps = prob * (math.expm1(2 * delta) + 2 * boundary) + 1e-6
            conf = 1 - prob
            free = ~robust_id  # a position whose id may differ has any confidence
            hi, lo = conf + eps, conf - eps
            may_beat = free.view(1, -1) | (hi.view(1, -1) >= lo.view(-1, 1))  # [P, Q]: Q may rank above P
            must_beat = ~free.view(1, -1) & (lo.view(1, -1) > hi.view(-1, 1))
            eye = torch.eye(len(conf), dtype=torch.bool, device=conf.device)
            chosen = (may_beat & ~eye).sum(1) < count
            not_chosen = (must_beat & ~eye).sum(1) >= count
            robust &= chosen | not_chosen
        keep_pos = robust.view(open_ref.shape)
        assert torch.equal(open_fast[keep_pos], open_ref[keep_pos]), (counter, delta)
        assert torch.equal(new_fast[keep_pos], new_ref[keep_pos]), (counter, delta)
        robust_total += int(robust.sum()) if count > 0 else 0
        total += robust.numel() if count > 0 else 0
        codes, open_mask = new_ref, open_ref  # teacher forcing: the reference's trajectory
    return robust_total, total


def test_margin_rule_holds_for_bf16_on_cpu():
    """The rule's own check, on the CPU: bf16 fast path (torch faces) against the reference."""
    config = SoundStormConfig(dim=32, depth=2, heads=2, dim_head=16, conv_kernel_size=5, num_quantizers=3,
                              codebook_size=64)
    net = SoundStorm(config)
    net.init_random(seed=3)
    g = torch.Generator().manual_seed(9)
    semantic = torch.randint(0, 64, (20,), generator=g)
    prompt_sem, prompt_ac = torch.randint(0, 64, (4,), generator=g), torch.randint(0, 64, (4, 3), generator=g)
    for greedy in (True, False):
        robust, total = decisions_where_margins_allow(net, semantic, prompt_sem, prompt_ac, seed=5, greedy=greedy,
                                                      fast_forward=lambda *a: net.forward_fast(*a, backend="torch"))
        print(f"greedy={greedy}: {robust} of {total} decisions with margin")
        assert robust > 0.3 * total, (robust, total)


# -- GPU ------------------------------------------------------------------------------------------
@pytest.fixture
def no_tf32():
    """float32 references on the GPU without TF32 (cuDNN's default for the depthwise conv)."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.gpu
def test_small_fast_path_gpu(no_tf32):
    """Every kernel of the fast path and a graph capture on the small config (cheap enough for
    compute-sanitizer: `compute-sanitizer python -m pytest -m gpu -k small tests/test_soundstorm_fast.py`)."""
    net = SoundStorm.from_pretrained(upstream_model(seed=7).state_dict(), SMALL).cuda()
    codes, semantic = (t.cuda() for t in _inputs(SMALL, 3, 11))
    lengths = torch.tensor([11, 7, 1]).cuda()
    valid = _valid(lengths, 11, SMALL.num_quantizers).cuda()
    with torch.no_grad():
        expected = net(codes, semantic, lengths)
    ok, *numbers = _bf16_rule(net.forward_fast(codes, semantic, lengths)[valid], expected[valid])
    assert ok, numbers
    items = [_item(40 + i, t, p) for i, (t, p) in enumerate([(30, 5), (7, 0), (50, 10)])]
    semantic_l = [s for s, _, _ in items]
    prompt = ([ps for _, ps, _ in items], [pa for _, _, pa in items])
    replayed = net.generate(semantic_l, prompt, seeds=[1, 2, 3], greedy=False)
    eager = net.generate(semantic_l, prompt, seeds=[1, 2, 3], greedy=False, cuda_graphs=False)
    assert net.captured_graphs == [(3, 128)] and net.graph_capture_seconds > 0
    assert all(torch.equal(a, b) for a, b in zip(replayed, eager))
    net.fast_dtype = torch.float32
    torch.testing.assert_close(net.forward_fast(codes, semantic, lengths)[valid], expected[valid], rtol=1e-4,
                               atol=1e-4)
    fp32 = net.generate(semantic_l, prompt, seeds=[1, 2, 3], greedy=False)
    reference = net.generate(semantic_l, prompt, seeds=[1, 2, 3], greedy=False, fast=False)
    # float32 on both paths: equal codes unless a decision's margin is below the paths' ~1e-6
    # difference (all equal on the CPU; the smallest logit gap on this trajectory is 2.7e-5, so
    # one item may flip on a GPU; a wiring error changes them all).
    assert sum(int(torch.equal(a, b)) for a, b in zip(fp32, reference)) >= len(items) - 1
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_fused_ops_match_reference_gpu(no_tf32):
    """bf16 at AnyGPT's widths: D 1024, C 2048, K 31, V 1024, Q 7 (bf16 tl.dot included; float32
    is covered by the interpreter tests and the float32 forward_fast checks)."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(11)
    b, n, q, v, d, c, k = 2, 200, 7, 1024, 1024, 2048, 31
    codes = torch.randint(0, v + 1, (b, n, q), generator=g).cuda()
    semantic = torch.randint(0, v, (b, n), generator=g).cuda()
    table, sem_table = _rand((q * (v + 1), d), dtype, g).cuda(), _rand((v, d), dtype, g).cuda()
    assert torch.equal(S.code_embedding(codes, semantic, table, sem_table),
                       S.code_embedding(codes, semantic, table, sem_table, backend="torch"))
    x, y = _rand((b * n, d), dtype, g, 2.0).cuda(), _rand((b * n, d), dtype, g).cuda()
    norms = [(torch.rand(d, generator=g).cuda() + 0.5, torch.randn(d, generator=g).cuda() * 0.1) for _ in range(2)]
    r1, r2 = x.clone(), x.clone()
    o1 = S.add_layer_norm(r1, y, alpha=0.5, post_norm=norms[0], norm=norms[1])
    o2 = S.add_layer_norm(r2, y, alpha=0.5, post_norm=norms[0], norm=norms[1], backend="torch")
    _close(r1, r2, dtype)
    _close(o1, o2, dtype)
    u = _rand((b, n, 2 * c), dtype, g, 1.5).cuda()
    lengths = torch.tensor([n, 77]).cuda()
    weight = torch.randn(k, c, generator=g).cuda().t()
    bias, gamma = torch.randn(c, generator=g).cuda(), torch.rand(c, generator=g).cuda() + 0.5
    _close(S.conformer_conv(u, lengths, weight, bias, gamma, eps=1e-6),
           S.conformer_conv(u, lengths, weight, bias, gamma, eps=1e-6, backend="torch"), dtype)
    h = _rand((b * n, q, d), dtype, g).cuda()
    w = _rand((q, d, v), dtype, g, d ** -0.5).cuda()
    ob = torch.randn(q, v, generator=g).cuda()
    got = S.grouped_linear(h, w, ob, out_dtype=torch.float32)
    expected = S.grouped_linear_reference(h, w, ob)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-3)
    torch.cuda.synchronize()


def _gpu_model(config=MEDIUM, seed=0):
    net = SoundStorm(config, device="cuda")
    net.init_random(seed=seed)
    return net.eval()


@pytest.mark.gpu
def test_forward_fast_logits_within_bf16_tolerance_gpu(no_tf32):
    """bf16 fast path against the float32 reference on the same GPU: a ragged batch of a medium
    config, and AnyGPT's config at 500 frames in the 512-frame bucket."""
    for config, b, n, lengths in ((MEDIUM, 3, 256, [256, 130, 1]), (SoundStormConfig.anygpt(), 1, 512, [500])):
        net = _gpu_model(config)
        g = torch.Generator().manual_seed(n)
        codes = torch.randint(0, config.codebook_size + 1, (b, n, config.num_quantizers), generator=g).cuda()
        semantic = torch.randint(0, config.codebook_size, (b, n), generator=g).cuda()
        lengths = torch.tensor(lengths).cuda()
        with torch.no_grad():
            expected = net(codes, semantic, lengths)
        got = net.forward_fast(codes, semantic, lengths)
        valid = _valid(lengths, n, config.num_quantizers).cuda()
        ok, *numbers = _bf16_rule(got[valid], expected[valid])
        assert ok, (config.dim, numbers)
        # The same kernels in float32: the reference's math in another op order (and the rope
        # kernel's cos/sin), so float32 rounding grown through the blocks.
        net.fast_dtype = torch.float32
        torch.testing.assert_close(net.forward_fast(codes, semantic, lengths)[valid], expected[valid], rtol=1e-3,
                                   atol=1e-3)
        del net


@pytest.mark.gpu
def test_graph_replay_equals_eager_gpu():
    net = _gpu_model()
    seconds = net.capture_graphs(batch_sizes=(1, 3), frames=(100, 200))
    assert seconds > 0 and net.captured_graphs == [(1, 128), (1, 256), (3, 128), (3, 256)]
    g = torch.Generator().manual_seed(5)
    items = [torch.randint(0, 1024, (t,), generator=g) for t in (180, 40, 97)]
    prompts = ([torch.randint(0, 1024, (p,), generator=g) for p in (10, 0, 3)],
               [torch.randint(0, 1024, (p, 7), generator=g) for p in (10, 0, 3)])
    for greedy in (True, False):
        replayed = net.generate(items, prompts, greedy=greedy, seeds=[1, 2, 3])
        eager = net.generate(items, prompts, greedy=greedy, seeds=[1, 2, 3], cuda_graphs=False)
        assert all(torch.equal(a, b) for a, b in zip(replayed, eager)), greedy
    # a shorter batch in the same bucket reuses its graph; logits bit for bit equal to eager
    single = net.generate(items[1:2], seeds=[2])
    assert torch.equal(single[0], net.generate(items[1:2], seeds=[2], cuda_graphs=False)[0])
    assert net.captured_graphs == [(1, 128), (1, 256), (3, 128), (3, 256)]
    graph = net._graphs[(3, 256)]
    graph.lengths.copy_(torch.tensor([256, 200, 3]))
    logits = graph.run(net).clone()
    eager_logits = net.forward_fast(graph.codes, graph.semantic, graph.lengths)
    assert torch.equal(logits, eager_logits)
    # new weights: the graphs are dropped and recaptured with them
    with torch.no_grad():
        net.out_bias.add_(0.5)
    net.generate(items[1:2], seeds=[2])
    assert net.captured_graphs == [(1, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("greedy", [True, False])
def test_fast_ids_equal_reference_where_margins_allow_gpu(greedy, no_tf32):
    net = _gpu_model(seed=1)
    g = torch.Generator().manual_seed(13)
    semantic = torch.randint(0, 1024, (150,), generator=g)
    prompt_sem, prompt_ac = torch.randint(0, 1024, (20,), generator=g), torch.randint(0, 1024, (20, 7), generator=g)
    robust, total = decisions_where_margins_allow(net, semantic, prompt_sem, prompt_ac, seed=7, greedy=greedy)
    print(f"greedy={greedy}: {robust} of {total} decisions with margin")
    assert robust > 0.3 * total, (robust, total)  # the rule is not vacuous
