"""Block manager invariants under random operations (hypothesis state machine) and prefix
sharing; the scheduler's preemption and admission rules."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from anygpt_engine.runtime.kv_cache import BlockManager, PagedKVCache
from anygpt_engine.runtime.scheduler import Request, Scheduler, TokenView
from anygpt_engine.sampling import SamplingParams

BS = 4


class BlockPoolMachine(RuleBasedStateMachine):
    """Sequences come, grow, get their tokens committed, and leave, over a small pool with a
    tiny token alphabet so prefixes collide often."""

    def __init__(self):
        super().__init__()
        self.manager = BlockManager(num_blocks=24, block_size=BS)
        self.tokens: dict[int, list[int]] = {}
        self.next_id = 0

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=30), extra=st.integers(0, 6))
    def admit(self, prompt, extra):
        cached = len(self.manager.match_prefix(prompt)) * BS
        n = len(prompt) - cached
        if not self.manager.can_admit(prompt, n):
            return
        got = self.manager.admit(self.next_id, prompt)
        assert got == cached and got < len(prompt)
        self.manager.grow(self.next_id, n)
        self.manager.commit(self.next_id, prompt)
        self.tokens[self.next_id] = list(prompt)
        self.next_id += 1

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), token=st.integers(0, 2))
    def decode(self, data, token):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        if not self.manager.can_grow(seq, 1):
            return
        self.manager.grow(seq, 1)
        self.tokens[seq].append(token)
        self.manager.commit(seq, self.tokens[seq])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def finish(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.manager.free(seq)
        del self.tokens[seq]

    @invariant()
    def invariants_hold(self):
        self.manager.check()

    @invariant()
    def tables_hold_their_tokens(self):
        for seq, tokens in self.tokens.items():
            table = self.manager.tables[seq]
            assert table.num_tokens == len(tokens)

    def teardown(self):
        for seq in list(self.tokens):
            self.manager.free(seq)
        self.manager.check()
        assert self.manager.num_used() == 0


TestBlockPool = BlockPoolMachine.TestCase
TestBlockPool.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 9), max_size=6), st.lists(st.integers(0, 9), max_size=6), st.integers(-8, 8),
       st.integers(-8, 8), st.sampled_from([None, 1, 2, -1]))
def test_token_view_behaves_like_the_concatenated_list(head, tail, start, stop, step):
    view, full = TokenView(head, tail), head + tail
    assert len(view) == len(full) and list(view) == full
    assert view[start:stop:step] == full[start:stop:step]
    for i in range(-len(full), len(full)):
        assert view[i] == full[i]
    with pytest.raises(IndexError):
        view[len(full)]


def test_identical_prefixes_share_full_blocks():
    m = BlockManager(num_blocks=16, block_size=BS)
    system = list(range(10))  # two full blocks + 2 tokens
    a, b = system + [50], system + [60]
    m.admit("a", a)
    m.grow("a", len(a))
    m.commit("a", a)
    assert m.match_prefix(b) == m.tables["a"].blocks[:2]
    assert m.admit("b", b) == 8
    m.grow("b", len(b) - 8)
    assert m.tables["b"].blocks[:2] == m.tables["a"].blocks[:2]
    assert m.tables["b"].blocks[2] != m.tables["a"].blocks[2]
    m.check()
    # After both end the shared blocks stay cached (LRU) and a third prompt revives them.
    m.free("a")
    m.free("b")
    m.check()
    assert m.num_cached() == 2 and m.num_used() == 0
    assert m.admit("c", system + [1]) == 8
    assert m.hit_rate() == pytest.approx(16 / (11 + 11 + 11))
    m.free("c")
    m.check()


def test_prefix_match_never_covers_the_last_token():
    m = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(8))  # exactly two blocks
    m.admit(0, tokens)
    m.grow(0, 8)
    m.commit(0, tokens)
    assert len(m.match_prefix(tokens)) == 1  # the last token must be recomputed for its logits
    assert len(m.match_prefix(tokens + [9])) == 2


def _cache_prefix(m, seq, tokens):
    """Runs a sequence over `tokens` and ends it: its full blocks stay cached."""
    m.admit(seq, tokens)
    m.grow(seq, len(tokens) - m.tables[seq].num_tokens)
    m.commit(seq, tokens)
    m.free(seq)


def test_cached_blocks_are_evicted_least_recently_used_first():
    """Three cached one-block prefixes a, b, c (cached in that order), then a used again: the
    order of last use is b, c, a. Taking the free blocks and then one, two, three more evicts b,
    then c, then a; the prefixes still cached are the ones a lookup still finds."""
    m = BlockManager(num_blocks=8, block_size=BS)  # 7 usable
    prefixes = {name: [base + i for i in range(BS)] for name, base in (("a", 10), ("b", 20), ("c", 30))}
    for name in "abc":
        _cache_prefix(m, name, prefixes[name] + [99])  # one full block, one partial (freed, not cached)
    _cache_prefix(m, "a again", prefixes["a"] + [98])  # a is revived from the cache, then cached anew
    assert m.num_cached() == 3 and m.num_free() == 4

    def cached():
        return {name for name, tokens in prefixes.items() if m.match_prefix(tokens + [0])}

    m.admit("big", [7] * 4 * BS)
    m.grow("big", 4 * BS)  # the 4 free blocks
    assert cached() == {"a", "b", "c"}
    for evicted, left in (("b", {"a", "c"}), ("c", {"a"}), ("a", set())):
        m.grow("big", BS)
        m.check()
        assert cached() == left, f"expected {evicted} evicted"


def test_a_freed_sequence_leaves_its_prefix_head_cached_longest():
    """free() hands a sequence's blocks to the LRU tail first: under pressure the cache gives up
    the end of a prefix before its start, which later prompts can still share."""
    m = BlockManager(num_blocks=5, block_size=BS)  # 4 usable
    tokens = list(range(2 * BS)) + [99]
    _cache_prefix(m, "seq", tokens)  # two full blocks cached, the partial third freed
    assert len(m.match_prefix(tokens)) == 2 and m.num_free() == 2
    m.admit("other", [7] * 3 * BS)
    m.grow("other", 3 * BS)  # both free blocks, then one cached block
    assert len(m.match_prefix(tokens)) == 1  # the head block survived


def test_kv_cache_rejects_bad_sizes():
    from anygpt_engine import ModelConfig
    config = ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="block_size=12, expected a power of two"):
        PagedKVCache(config, 4, 12, "cpu", None)
    with pytest.raises(ValueError, match="num_blocks=1"):
        PagedKVCache(config, 1, 16, "cpu", None)


def _request(i, prompt_len, max_new):
    return Request(i, [1] * prompt_len, SamplingParams(max_new_tokens=max_new), 0, frozenset(), max_new, i, 0)


def test_scheduler_preempts_the_newest_running_request():
    blocks = BlockManager(num_blocks=7, block_size=BS, enable_prefix_caching=False)  # 6 usable
    sched = Scheduler(blocks, max_batch_size=4, max_num_batched_tokens=64)
    for i in range(3):
        sched.add(_request(i, 8, 20))  # 2 blocks each: the pool is full after admission
    plan = sched.schedule()
    assert [c.request.request_id for c in plan.prefills] == [0, 1, 2]
    for chunk in plan.prefills:
        chunk.request.num_computed, chunk.request.prefilled = chunk.end, True
        chunk.request.output.append(5)
    plan = sched.schedule()  # each needs a third block for its 9th token: request 2 must go
    assert [r.request_id for r in plan.preempted] == [2]
    assert [r.request_id for r in plan.decodes] == [0, 1]
    assert [r.request_id for r in sched.waiting] == [2]
    assert sched.num_preemptions == 1
    assert sched.waiting[0].num_computed == 0 and not sched.waiting[0].prefilled
    blocks.check()


def test_scheduler_respects_token_budget_and_chunks_prefill():
    blocks = BlockManager(num_blocks=64, block_size=BS)
    sched = Scheduler(blocks, max_batch_size=4, max_num_batched_tokens=10)
    sched.add(_request(0, 25, 4))
    plans = []
    for _ in range(3):
        plans.append(sched.schedule())
        for chunk in plans[-1].prefills:
            chunk.request.num_computed = chunk.end  # what the engine does after running it
    chunks = [(c.start, c.end) for p in plans for c in p.prefills]
    assert chunks == [(0, 10), (10, 20), (20, 25)]
    assert plans[-1].prefills[0].is_last


def test_soak_random_requests_through_a_small_pool():
    """2,000 random requests through a 40-block pool with random aborts: every request
    completes with its full output and no block leaks."""
    rng = random.Random(0)
    blocks = BlockManager(num_blocks=41, block_size=BS)
    sched = Scheduler(blocks, max_batch_size=8, max_num_batched_tokens=48)
    pending = [_request(i, rng.randint(1, 40), rng.randint(1, 30)) for i in range(2000)]
    for r in pending:
        r.prompt = [rng.randint(0, 3) for _ in r.prompt]  # shared prefixes happen
    done, aborted, added, steps = [], [], 0, 0
    while added < len(pending) or sched.has_unfinished():
        while added < len(pending) and len(sched.waiting) < 16:
            sched.add(pending[added])
            added += 1
        plan = sched.schedule()
        steps += 1
        assert plan.decodes or plan.prefills, "no progress"
        ended = []
        for r in plan.decodes:
            r.num_computed += 1
            r.output.append(rng.randint(0, 3))
            blocks.commit(r.request_id, r.tokens)
            if len(r.output) >= r.max_new:
                ended.append(r)
        for chunk in plan.prefills:
            r = chunk.request
            r.num_computed = chunk.end
            blocks.commit(r.request_id, r.tokens[:chunk.end])
            if chunk.is_last:
                r.prefilled = True
                r.output.append(rng.randint(0, 3))
                if len(r.output) >= r.max_new:
                    ended.append(r)
        for r in ended:
            sched.remove(r)
            done.append(r)
        if rng.random() < 0.01 and sched.running:
            victim = rng.choice(sched.running)
            sched.remove(victim)
            aborted.append(victim)
        if steps % 50 == 0:
            blocks.check()
    blocks.check()
    assert len(done) + len(aborted) == 2000
    assert all(len(r.output) == r.max_new for r in done)
    assert blocks.num_used() == 0 and not blocks.tables
    assert sorted(sched.free_slots) == list(range(8))
    assert sched.num_preemptions > 0 and blocks.hit_tokens > 0  # both paths were exercised


class ForkingPoolMachine(RuleBasedStateMachine):
    """Sequences are admitted, forked (beam search), grown alone or several at once, and freed,
    over a small pool with a tiny alphabet; a model of the cache's contents runs the queued
    copies-on-write and the token writes, so every live sequence must read its own tokens back
    through its table (a missing or misdirected copy, or a write into a shared block, shows)."""

    def __init__(self):
        super().__init__()
        self.manager = BlockManager(num_blocks=20, block_size=BS)
        self.tokens: dict[int, list[int]] = {}
        self.content: dict[int, list] = {}  # block -> the token each slot holds
        self.next_id = 0

    def _write(self, seq, start):
        table = self.manager.tables[seq].blocks
        for p in range(start, len(self.tokens[seq])):
            self.content.setdefault(table[p // BS], [None] * BS)[p % BS] = self.tokens[seq][p]

    def _run_copies(self):
        for src, dst in self.manager.take_copies():
            self.content[dst] = list(self.content[src])

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=14))
    def admit(self, prompt):
        cached = len(self.manager.match_prefix(prompt)) * BS
        if not self.manager.can_admit(prompt, len(prompt) - cached):
            return
        assert self.manager.admit(self.next_id, prompt) == cached
        self.manager.grow(self.next_id, len(prompt) - cached)
        self.tokens[self.next_id] = list(prompt)
        self._run_copies()
        self._write(self.next_id, cached)
        self.manager.commit(self.next_id, prompt)
        self.next_id += 1

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        self.manager.fork(parent, self.next_id)
        self.tokens[self.next_id] = list(self.tokens[parent])
        self.next_id += 1

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def decode_together(self, data):
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, max_size=4, unique=True))
        need = self.manager.blocks_needed(seqs, 1)
        available = self.manager.num_available()
        if need > available:
            return
        for seq in seqs:
            self.manager.grow(seq, 1)
        assert available - self.manager.num_available() == need  # the accounting is exact
        self._run_copies()
        for seq in seqs:
            self.tokens[seq].append(data.draw(st.integers(0, 2)))
            self._write(seq, len(self.tokens[seq]) - 1)
            self.manager.commit(seq, self.tokens[seq])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def finish(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.manager.free(seq)
        del self.tokens[seq]

    @invariant()
    def invariants_hold(self):
        self.manager.check()

    @invariant()
    def every_sequence_reads_its_tokens(self):
        for seq, tokens in self.tokens.items():
            table = self.manager.tables[seq]
            assert table.num_tokens == len(tokens)
            assert [self.content[table.blocks[p // BS]][p % BS] for p in range(len(tokens))] == tokens

    def teardown(self):
        for seq in list(self.tokens):
            self.manager.free(seq)
        self.manager.check()
        assert self.manager.num_used() == 0


TestForkingPool = ForkingPoolMachine.TestCase
TestForkingPool.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


def test_fork_shares_every_block_and_copies_only_a_shared_partial_tail():
    m = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(10))  # blocks 1, 2 full; block 3 holds 2 tokens
    m.admit("a", tokens)
    m.grow("a", 10)
    m.commit("a", tokens)
    m.fork("a", "b")
    m.fork("a", "c")
    assert m.tables["b"].blocks == m.tables["c"].blocks == m.tables["a"].blocks
    assert m.num_used() == 3 and m.take_copies() == []
    with pytest.raises(ValueError, match="sequence 'b' already holds blocks"):
        m.fork("a", "b")
    # Three holders of the partial block all grow: two copies, the last keeps the original.
    assert m.blocks_needed(["a", "b", "c"], 1) == 2
    tail = m.tables["a"].blocks[2]
    for seq in ("a", "b", "c"):
        m.grow(seq, 1)
    copies = m.take_copies()
    assert [src for src, _ in copies] == [tail, tail] and m.tables["c"].blocks[2] == tail
    assert {dst for _, dst in copies} == {m.tables["a"].blocks[2], m.tables["b"].blocks[2]}
    assert m.tables["a"].blocks[:2] == m.tables["b"].blocks[:2] == m.tables["c"].blocks[:2]
    m.check()
    # With an outside holder left, one growing sequence copies too: position 11 goes into a
    # copy of a's block 3, position 12 into a new block.
    m.fork("a", "d")
    assert m.blocks_needed(["a"], 1) == 1 and m.blocks_needed(["a"], 2) == 2
    m.grow("a", 2)
    assert len(m.take_copies()) == 1 and m.num_used() == 7
    # A full last block is never copied: the next token starts a new block.
    m.grow("d", 5)  # d: 16 tokens, its block 3 now a private copy
    m.take_copies()
    m.fork("d", "e")
    assert m.blocks_needed(["d", "e"], 1) == 2
    m.grow("d", 1)
    m.grow("e", 1)
    assert m.take_copies() == [] and m.tables["d"].blocks[:4] == m.tables["e"].blocks[:4]
    for seq in "abcde":
        m.free(seq)
    m.check()
    assert m.num_used() == 0


def test_a_freed_copy_target_leaves_no_copy_behind():
    m = BlockManager(num_blocks=8, block_size=BS)
    m.admit("a", [1, 2])
    m.grow("a", 2)
    m.fork("a", "b")
    m.grow("b", 1)
    m.free("b")  # preempted before the step ran: its private copy is gone, so is the copy
    assert m.take_copies() == []
    m.check()
