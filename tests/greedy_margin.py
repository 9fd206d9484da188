"""Comparing greedy tokens of two engine paths that round differently (bfloat16 graph replay
against eager decode, recomputed K/V after a preemption, GPU against CPU).

Premise: each path's logits are within delta = rel_delta * max|logits| of a float32 reference's
at every step (the bound tests/test_gpu_engine.py checks for the prefill logits: 1e-4 in float32,
0.05 in bfloat16). A greedy path can then only pick a token whose reference logit is within
2 delta of the best legal one. So the two paths must agree token for token until a decision the
margin does not certify; there both picks must be within 2 delta of the best (a path that picks
anything else is wrong), and after it the trajectories differ and are no longer compared."""

import torch


def assert_greedy_agree_where_margins_allow(got, expected, prompts, reference, rel_delta) -> int:
    """`got`, `expected`: greedy token lists for `prompts` from two paths (modality constraints
    on, no stop-token suppression); `reference`: an Engine with the same weights whose logits
    are the yardstick. Returns how many tokens were compared."""
    compared = 0
    for prompt, a, b in zip(prompts, got, expected):
        assert len(a) == len(b), (prompt, a, b)
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        compared += n
        if n == len(a):
            continue
        context = list(prompt) + a[:n]
        logits = reference.logits(context)[-1].double().cpu()
        constraint = reference.constraint
        legal = constraint.allowed[constraint.state_after(context)].cpu()
        logits = logits.masked_fill(~legal, -torch.inf)
        delta = rel_delta * logits[legal].abs().max().item()
        best = logits.max().item()
        for path, token in (("got", a[n]), ("expected", b[n])):
            assert logits[token] >= best - 2 * delta, (
                f"prompt {prompt[:8]}...: at new token {n} {path} picked {token} (reference logit "
                f"{logits[token]:.5g}), more than 2 delta = {2 * delta:.3g} below the best {best:.5g}: "
                "a decision with margin, so one path is wrong")
    return compared
