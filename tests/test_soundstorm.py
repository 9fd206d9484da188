"""SoundStorm: the reference network against the upstream module tree rebuilt here from its
description (soundstorm-speechtokenizer as AnyGPT vendors it), the checkpoint loader, and
generate against AnyGPT's generate loop written out here line by line."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anygpt_engine import SoundStorm, SoundStormConfig, ops

SMALL = SoundStormConfig(dim=32, depth=2, heads=2, dim_head=16, conv_kernel_size=5, num_quantizers=3,
                         codebook_size=16)


# -- the upstream module tree, rebuilt from its description -------------------------------------
class Swish(nn.Module):
    def forward(self, x):
        return x * x.sigmoid()


class Transpose(nn.Module):  # einops Rearrange('b n c -> b c n') and back
    def forward(self, x):
        return x.transpose(1, 2)


class GLU(nn.Module):
    def forward(self, x):
        out, gate = x.chunk(2, dim=1)
        return out * gate.sigmoid()


class Scale(nn.Module):
    def __init__(self, scale, fn):
        super().__init__()
        self.scale, self.fn = scale, fn

    def forward(self, x, **kwargs):
        return self.fn(x, **kwargs) * self.scale


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.fn, self.norm = fn, nn.LayerNorm(dim)

    def forward(self, x, **kwargs):
        return self.fn(self.norm(x), **kwargs)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), Swish(), nn.Dropout(0.0), nn.Linear(dim * mult, dim),
                                 nn.Dropout(0.0))

    def forward(self, x):
        return self.net(x)


class Attention(nn.Module):
    """attn_flash=False: einsum similarity, -finfo.max on padded keys, softmax."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x, mask=None, rotary_emb=None):
        b, n, _ = x.shape
        q, k, v = (self.to_q(x), *self.to_kv(x).chunk(2, dim=-1))
        q, k, v = (t.view(b, n, self.heads, -1).permute(0, 2, 1, 3) for t in (q, k, v))

        def rotate(t):
            t1, t2 = t.chunk(2, dim=-1)
            return t * rotary_emb.cos() + torch.cat((-t2, t1), dim=-1) * rotary_emb.sin()

        q, k = rotate(q), rotate(k)
        sim = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
        if mask is not None:
            sim = sim.masked_fill(~mask[:, None, None, :], -torch.finfo(sim.dtype).max)
        out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
        return self.to_out(out.permute(0, 2, 1, 3).reshape(b, n, -1))


class DepthWiseConv1d(nn.Module):
    def __init__(self, chan, kernel_size, padding):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv1d(chan, chan, kernel_size, groups=chan)

    def forward(self, x, mask=None):
        if mask is not None:
            x = x.masked_fill(~mask[:, None, :], 0.0)
        out = self.conv(F.pad(x, self.padding))
        return out if mask is None else out.masked_fill(~mask[:, None, :], 0.0)


class ChanLayerNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, dim, 1))

    def forward(self, x):
        eps = 1e-6 if x.dtype == torch.float32 else 1e-4
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        return (x - x.mean(dim=1, keepdim=True)) * var.clamp(min=eps).rsqrt() * self.gamma


class ConvModule(nn.Module):
    def __init__(self, dim, kernel_size, expansion=2):
        super().__init__()
        inner = dim * expansion
        self.net1 = nn.Sequential(nn.LayerNorm(dim), Transpose(), nn.Conv1d(dim, 2 * inner, 1), GLU())
        self.ds_conv = DepthWiseConv1d(inner, kernel_size, (kernel_size // 2, kernel_size // 2 - (kernel_size + 1) % 2))
        self.net2 = nn.Sequential(Swish(), ChanLayerNorm(inner), nn.Conv1d(inner, dim, 1), Transpose(), nn.Dropout(0.0))

    def forward(self, x, mask=None):
        return self.net2(self.ds_conv(self.net1(x), mask=mask))


class ConformerBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ff1 = Scale(0.5, PreNorm(c.dim, FeedForward(c.dim)))
        self.attn = PreNorm(c.dim, Attention(c.dim, c.heads, c.dim_head))
        self.conv = ConvModule(c.dim, c.conv_kernel_size)
        self.ff2 = Scale(0.5, PreNorm(c.dim, FeedForward(c.dim)))
        self.post_norm = nn.LayerNorm(c.dim)

    def forward(self, x, mask, rotary_emb):
        x = self.ff1(x) + x
        x = self.attn(x, mask=mask, rotary_emb=rotary_emb) + x
        x = self.conv(x, mask=mask) + x
        x = self.ff2(x) + x
        return self.post_norm(x)


class Conformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dim_head = c.dim_head
        self.layers = nn.ModuleList(ConformerBlock(c) for _ in range(c.depth))

    def forward(self, x, mask=None):
        inv_freq = 1.0 / (10000 ** (torch.arange(0, self.dim_head, 2).float() / self.dim_head))
        freqs = torch.einsum("i,j->ij", torch.arange(x.shape[1]).float(), inv_freq)
        rotary_emb = torch.cat((freqs, freqs), dim=-1)
        for block in self.layers:
            x = block(x, mask, rotary_emb)
        return x


class EinMix(nn.Module):
    """'b n gq d -> b n gq l', weight 'gq d l', bias 'gq l' (einops stores it [1, 1, gq, l])."""

    def __init__(self, q, d, v):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(q, d, v))
        self.bias = nn.Parameter(torch.randn(1, 1, q, v))

    def forward(self, x):
        return torch.einsum("bnqd,qdl->bnql", x, self.weight) + self.bias


class Rearrange(nn.Module):
    """The three einops Rearranges of the heads: 'b n (h d) -> b (n h) d',
    'b (n gq) d -> b n gq d' and 'b ... d -> b (...) d'."""

    def __init__(self, kind, q):
        super().__init__()
        self.kind, self.q = kind, q

    def forward(self, x):
        b, d = x.shape[0], x.shape[-1]
        if self.kind == "split_heads":
            return x.reshape(b, x.shape[1] * self.q, d // self.q)
        if self.kind == "group":
            return x.reshape(b, -1, self.q, d)
        return x.reshape(b, -1, d)


class ConformerWrapper(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.q, self.v = c.num_quantizers, c.codebook_size
        self.conformer = Conformer(c)
        self.code_embeds = nn.Embedding(c.num_quantizers * (c.codebook_size + 1), c.dim)
        q = c.num_quantizers
        self.heads = nn.Sequential(nn.Linear(c.dim, c.dim * q), Rearrange("split_heads", q))
        self.to_logits = nn.Sequential(nn.LayerNorm(c.dim), Rearrange("group", q), EinMix(q, c.dim, c.codebook_size),
                                       Rearrange("flatten", q))

    def forward(self, x, mask=None, cond=None):  # x [B, N*Q] flat ids
        b = x.shape[0]
        x = x.view(b, -1, self.q) + torch.arange(self.q) * (self.v + 1)
        x = self.code_embeds(x).sum(dim=2) + cond
        return self.to_logits(self.heads(self.conformer(x, mask=mask)))


class UpstreamSoundStorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.net = ConformerWrapper(c)
        self.semantic_token_emb = nn.Embedding(c.codebook_size, c.dim)


def upstream_model(c=SMALL, seed=0):
    """Every parameter random, biases and norms included, so none of them can be misplaced."""
    model = UpstreamSoundStorm(c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if ("norm" in name or "gamma" in name or "bias" in name) else p.shape[-1] ** -0.5
            base = 1.0 if (("norm" in name and name.endswith("weight")) or "gamma" in name) else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _inputs(c, b, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, c.codebook_size + 1, (b, n, c.num_quantizers), generator=g)
    semantic = torch.randint(0, c.codebook_size, (b, n), generator=g)
    return codes, semantic


# -- the network ---------------------------------------------------------------------------------
def test_network_matches_upstream_tree_with_key_padding():
    up = upstream_model()
    model = SoundStorm.from_pretrained(up.state_dict(), SMALL)
    codes, semantic = _inputs(SMALL, 3, 11)
    lengths = torch.tensor([11, 7, 1])
    mask = torch.arange(11) < lengths[:, None]
    with torch.no_grad():
        expected = up.net(codes.view(3, -1), mask=mask, cond=up.semantic_token_emb(semantic))
        got = model(codes, semantic, lengths)
    valid = mask.repeat_interleave(SMALL.num_quantizers, dim=1)
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)
    # Without lengths nothing is masked (upstream generate passes an all-true mask).
    with torch.no_grad():
        torch.testing.assert_close(model(codes, semantic), up.net(codes.view(3, -1), mask=torch.ones_like(mask),
                                                                  cond=up.semantic_token_emb(semantic)),
                                   rtol=1e-5, atol=1e-5)


def test_padding_is_invisible_to_valid_frames():
    model = SoundStorm.from_pretrained(upstream_model().state_dict(), SMALL)
    codes, semantic = _inputs(SMALL, 1, 9)
    padded_codes, padded_sem = _inputs(SMALL, 1, 14, seed=5)
    padded_codes[:, :9], padded_sem[:, :9] = codes, semantic
    with torch.no_grad():
        alone = model(codes, semantic)
        padded = model(padded_codes, padded_sem, torch.tensor([9]))
    torch.testing.assert_close(padded[:, :9 * SMALL.num_quantizers], alone, rtol=1e-5, atol=1e-5)


def test_anygpt_config_has_351m_parameters():
    model = SoundStorm(SoundStormConfig.anygpt(), device="meta")
    assert 350e6 < sum(p.numel() for p in model.parameters()) < 352e6
    with pytest.raises(ValueError, match=r"SoundStormConfig.heads=0, expected a positive int"):
        SoundStormConfig(heads=0)


# -- the loader ------------------------------------------------------------------------------------
def test_loader_round_trip_from_file(tmp_path):
    up = upstream_model(seed=3)
    path = tmp_path / "speechtokenizer_soundstorm_mls.pt"
    torch.save(up.state_dict(), path)
    model = SoundStorm.from_pretrained(str(path), SMALL)
    state = up.state_dict()
    block = model.layers[1]
    prefix = "net.conformer.layers.1."
    inner = SMALL.inner_dim
    assert torch.equal(block.wqkv[:inner], state[prefix + "attn.fn.to_q.weight"])
    assert torch.equal(block.wqkv[inner:], state[prefix + "attn.fn.to_kv.weight"])
    assert torch.equal(block.depthwise.weight, state[prefix + "conv.ds_conv.conv.weight"])
    assert torch.equal(block.chan_norm, state[prefix + "conv.net2.1.gamma"].flatten())
    assert torch.equal(model.out_bias, state["net.to_logits.2.bias"].view(SMALL.num_quantizers, -1))
    # Also accepted: the unpatched upstream conv names, a {'model': ...} package, a plain bias shape.
    renamed = {k.replace("conv.net1.0", "conv.net.0").replace("conv.net1.2", "conv.net.2")
               .replace("conv.ds_conv.conv", "conv.net.4.conv").replace("conv.net2.1", "conv.net.6")
               .replace("conv.net2.2", "conv.net.7"): v for k, v in state.items()}
    renamed["net.to_logits.2.bias"] = renamed["net.to_logits.2.bias"].view(SMALL.num_quantizers, -1)
    other = SoundStorm.from_pretrained({"model": renamed}, SMALL)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name


def test_loader_rejects_mismatches_clearly(tmp_path):
    state = upstream_model().state_dict()
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="could not be read as a torch state dict"):
        SoundStorm.from_pretrained(str(bad), SMALL)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SoundStorm.from_pretrained(str(tmp_path / "absent.pt"), SMALL)
    with pytest.raises(ValueError, match="expected a state dict"):
        SoundStorm.from_pretrained([1, 2, 3], SMALL)
    missing = dict(state)
    del missing["net.conformer.layers.0.attn.fn.to_kv.weight"]
    with pytest.raises(ValueError, match=r"missing 1 \[net.conformer.layers.0.attn.fn.to_kv.weight\]"):
        SoundStorm.from_pretrained(missing, SMALL)
    extra = dict(state, **{"net.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected 1 \[net.extra.weight\]"):
        SoundStorm.from_pretrained(extra, SMALL)
    wrong = dict(state, **{"net.heads.0.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"wrong shape 1 \[net.heads.0.bias \(5,\) \(expected \(96,\)"):
        SoundStorm.from_pretrained(wrong, SMALL)
    deeper = SoundStormConfig(**{**SMALL.__dict__, "depth": 3})
    with pytest.raises(ValueError, match=r"missing \d+ \[net.conformer.layers.2."):
        SoundStorm.from_pretrained(state, deeper)


# -- generation --------------------------------------------------------------------------------
def anygpt_generate(net, semantic, prompt_sem, prompt_ac, steps, greedy, uniform, c=SMALL):
    """AnyGPT's SoundStorm.generate for one item, step for step, with the Gumbel draws taken from
    `uniform(counter)` and torch.topk / stable argsort where upstream uses topk / argsort."""
    q_levels, v = c.num_quantizers, c.codebook_size
    t = semantic.shape[-1]
    mask = torch.ones((1, t, q_levels))
    masked = mask * c.mask_id
    cond = semantic[None]
    if prompt_sem is not None:
        cond = torch.cat([prompt_sem[None], cond], dim=-1)
        masked = torch.cat([prompt_ac[None].float(), masked], dim=1)
        mask = torch.cat([torch.zeros_like(prompt_ac[None], dtype=torch.bool), mask.bool()], dim=1)
    else:
        mask = mask.bool()
    prompt_mask = mask.clone()
    n = cond.shape[-1]
    times = torch.linspace(0.0, 1.0, steps + 1)
    all_counts = (torch.cos(times * math.pi / 2)[:, None] * torch.tensor([n])).long()
    for q in range(q_levels):
        counts = all_counts if q < 1 else torch.zeros((1, 1), dtype=torch.long)
        for i, count in enumerate(counts):
            logits = net(masked.long(), cond)
            if greedy and (q >= 1 or (count == 0).all()):
                ids = logits.argmax(dim=-1)
            else:
                top = logits.topk(math.ceil((1 - 0.7) * v), dim=-1)
                logits = torch.full_like(logits, float("-inf")).scatter_(2, top.indices, top.values)
                u = uniform(i if q == 0 else steps + q).double()
                gumbel = (-torch.log(-torch.log(u + 1e-10) + 1e-10)).float()
                ids = (logits / max(1.0 * i / steps, 1e-10) + gumbel).argmax(dim=-1)
            if q >= 1:
                masked[:, :, q:] = ids.view(1, n, q_levels)[:, :, q:].float()
                mask[:, :, q] = False
                continue
            masked = torch.where(mask, ids.view(1, n, q_levels).float(), masked)
            if (count == 0).all():
                continue
            scores = (1 - logits.softmax(dim=-1)).gather(2, ids[..., None])[..., 0]
            mask = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1) < count
            mask = mask.view(1, n, q_levels)
            mask[:, :, 1:] = True
            mask = mask & prompt_mask
            masked = masked.masked_fill(mask, c.mask_id)
    return torch.cat([semantic[None, :, None], masked[:, -t:].long()], dim=-1)[0]


@pytest.fixture(scope="module")
def model():
    return SoundStorm.from_pretrained(upstream_model(seed=7).state_dict(), SMALL)


def _item(seed, t, p):
    g = torch.Generator().manual_seed(seed)
    semantic = torch.randint(0, SMALL.codebook_size, (t,), generator=g)
    prompt_sem = torch.randint(0, SMALL.codebook_size, (p,), generator=g)
    prompt_ac = torch.randint(0, SMALL.codebook_size, (p, SMALL.num_quantizers), generator=g)
    return semantic, prompt_sem, prompt_ac


@pytest.mark.parametrize("greedy", [True, False])
@pytest.mark.parametrize("prompted", [False, True])
@pytest.mark.parametrize("steps,frames", [(3, 13), (5, 13), (3, 1), (1, 4)])
def test_generate_matches_anygpt_loop(model, greedy, prompted, steps, frames):
    """Includes one frame (c_1 = c_2 = 0 before the last step: upstream keeps looping) and steps=1."""
    semantic, prompt_sem, prompt_ac = _item(steps, frames, 4)
    seed = 1234 + steps

    def uniform(counter, n):
        return ops.maskgit_uniform(torch.tensor([seed]), counter, n * SMALL.num_quantizers, SMALL.codebook_size)

    n = frames + (4 if prompted else 0)
    with torch.no_grad():
        expected = anygpt_generate(lambda a, s: model(a.view(1, n, -1), s), semantic,
                                   prompt_sem if prompted else None, prompt_ac if prompted else None, steps, greedy,
                                   lambda counter: uniform(counter, n))
    prompt = (prompt_sem[None], prompt_ac[None]) if prompted else None
    got = model.generate(semantic[None], prompt, steps=steps, greedy=greedy, seeds=[seed])
    assert torch.equal(got[0], expected)
    # The same draws injected explicitly give the same codes.
    injected = model.generate(semantic[None], prompt, steps=steps, greedy=greedy,
                              noise=lambda counter: uniform(counter, n))
    assert torch.equal(injected, got)


@pytest.mark.parametrize("greedy", [True, False])
def test_batched_ragged_equals_one_by_one(model, greedy):
    items = [_item(10 + i, t, p) for i, (t, p) in enumerate([(9, 3), (1, 0), (14, 6), (5, 1)])]
    seeds = [11, -3, 2**40 + 5, 0]
    semantic = [s for s, _, _ in items]
    prompt = ([ps for _, ps, _ in items], [pa for _, _, pa in items])
    batched = model.generate(semantic, prompt, greedy=greedy, seeds=seeds)
    for i, (s, ps, pa) in enumerate(items):
        alone = model.generate([s], ([ps], [pa]), greedy=greedy, seeds=[seeds[i]])
        assert torch.equal(batched[i], alone[0]), i
    # Padded tensors with lengths give the same codes, -1 past each length.
    padded = torch.zeros(4, 14, dtype=torch.int64)
    prompt_sem = torch.zeros(4, 6, dtype=torch.int64)
    prompt_ac = torch.zeros(4, 6, SMALL.num_quantizers, dtype=torch.int64)
    for i, (s, ps, pa) in enumerate(items):
        padded[i, :len(s)], prompt_sem[i, :len(ps)], prompt_ac[i, :len(pa)] = s, ps, pa
    out = model.generate(padded, (prompt_sem, prompt_ac), greedy=greedy, seeds=seeds,
                         lengths=[len(s) for s in semantic], prompt_lengths=[len(ps) for _, ps, _ in items])
    for i, row in enumerate(batched):
        assert torch.equal(out[i, :len(row)], row)
        assert (out[i, len(row):] == -1).all()


def test_generate_output_and_seeds(model):
    semantic = torch.randint(0, SMALL.codebook_size, (2, 6))
    out = model.generate(semantic, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 6, 1 + SMALL.num_quantizers)
    assert torch.equal(out[..., 0], semantic)
    assert ((out >= 0) & (out < SMALL.codebook_size)).all()
    again = model.generate(semantic, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_generate_rejects_bad_input_clearly(model):
    with pytest.raises(ValueError, match=r"semantic_ids\[0\] has values in \[0, 16\], expected \[0, 16\)"):
        model.generate(torch.tensor([[0, 16]]))
    with pytest.raises(ValueError, match=r"semantic_ids\[1\] has 0 frames, expected at least 1"):
        model.generate([[1, 2], []])
    with pytest.raises(ValueError, match=r"steps=0, expected an int >= 1"):
        model.generate([[1]], steps=0)
    with pytest.raises(ValueError, match=r"seeds=\[1\], expected 2 ints"):
        model.generate([[1], [2]], seeds=[1])
    with pytest.raises(ValueError, match=r"prompt acoustic\[0\].shape=\(2, 2\), expected 2 dims with 3 levels"):
        model.generate([[1]], ([[1, 2]], [torch.zeros(2, 2, dtype=torch.long)]))
    with pytest.raises(ValueError, match=r"lengths of semantic_ids=\[3\], expected 1 values in \[0, 2\]"):
        model.generate(torch.tensor([[1, 2]]), lengths=[3])
    with pytest.raises(TypeError, match="prompt must be None or a pair"):
        model.generate([[1]], prompt=torch.zeros(1, 2))


def test_generate_with_triton_step_equals_torch(model):
    items = [_item(30, 5, 2)[0], _item(31, 3, 0)[0]]
    expected = model.generate(items, seeds=[5, 6], steps=2)
    got = model.generate(items, seeds=[5, 6], steps=2, backend="triton")
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_generate_on_gpu_matches_cpu(backend):
    """Same weights on GPU: identical codes where the logits' margins allow (float32 network on
    both, fast=False: the reference path; the faces of the step agree bit for bit, the networks
    to ~1e-6). The bf16 fast path is tested in test_soundstorm_fast.py."""
    model = SoundStorm.from_pretrained(upstream_model(seed=7).state_dict(), SMALL)
    items = [_item(40 + i, t, p) for i, (t, p) in enumerate([(30, 5), (7, 0), (50, 10)])]
    semantic = [s for s, _, _ in items]
    prompt = ([ps for _, ps, _ in items], [pa for _, _, pa in items])
    expected = model.generate(semantic, prompt, seeds=[1, 2, 3])
    got = model.to("cuda").generate(semantic, prompt, seeds=[1, 2, 3], backend=backend, fast=False)
    same = sum(int(torch.equal(a.cpu(), b)) for a, b in zip(got, expected))
    assert same == len(items)
