"""Automatic prefix caching: the allocator's LRU of cached blocks, reuse of the longest cached prefix, and
exactness: with caching on, greedy tokens, seeded samples (n > 1) and prompt logprobs equal caching off, on the
demo model and the sliding-window parity model, with and without preemption."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.engine.llm_engine import LLMEngine
from cluster.engine.loader import build_local_engine
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import EngineConfig
from cluster.model.kv_cache import BlockAllocator, chain_block_hash
from tests.conftest import make_hf_checkpoint
from tests.test_parity_hf import PARITY_CONFIGS
from tests.test_scheduler import Collector

WINDOW8 = "e8-top2-gqa4-window8-untied-sharded"
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.integers(1, 32))
def test_allocator_with_cached_blocks_never_leaks(seed: int, num_blocks: int) -> None:
    """Random allocate / cache / release / revive-from-cache: counts match the tables, a block is free iff
    unheld, the cache map never points at a block handed out again under another hash."""
    rng = random.Random(seed)
    alloc = BlockAllocator(num_blocks)
    tables: list[list[int]] = []
    hash_of: dict[int, bytes] = {}  # what we registered and expect to still find, unless evicted
    for step in range(3000):
        op = rng.random()
        if op < 0.35 and alloc.num_free:
            block = alloc.allocate()
            hash_of.pop(block, None)  # handed out again: its old content is gone
            if tables and rng.random() < 0.5:
                rng.choice(tables).append(block)
            else:
                tables.append([block])
        elif op < 0.5 and tables:  # cache a held block
            table = rng.choice(tables)
            if table:
                block = rng.choice(table)
                h = chain_block_hash(None, [step])
                alloc.register(block, h)
                if alloc.cached(h) == block:
                    hash_of[block] = h
        elif op < 0.65 and hash_of:  # a new sequence takes a cached block
            block = rng.choice(list(hash_of))
            assert alloc.cached(hash_of[block]) == block
            alloc.touch(block)
            tables.append([block])
        elif tables:
            alloc.release_all(tables.pop(rng.randrange(len(tables))))
        held: dict[int, int] = {}
        for table in tables:
            for block in table:
                held[block] = held.get(block, 0) + 1
        assert all(alloc.refcount(b) == held.get(b, 0) for b in range(num_blocks))
        assert alloc.num_free == num_blocks - len(held)
        assert all(alloc.cached(h) == b for b, h in hash_of.items())
    for table in tables:
        alloc.release_all(table)
    assert alloc.num_free == num_blocks


def test_freed_blocks_are_evicted_least_recently_used_first_and_uncached_ones_before_them() -> None:
    alloc = BlockAllocator(4)
    a, b, c = alloc.allocate(), alloc.allocate(), alloc.allocate()
    alloc.register(a, b"A")
    alloc.register(b, b"B")
    alloc.release_all([a, b])  # b (a table's tail) is freed first, so it is evicted before a
    alloc.release(c)  # c holds nothing cached: it is handed out before any cached block
    assert [alloc.allocate() for _ in range(2)] == [c, 3]
    assert alloc.allocate() == b and alloc.cached(b"B") is None and alloc.cached(b"A") == a
    assert alloc.allocate() == a and alloc.cached(b"A") is None and alloc.num_cached == 0


def engine_for(model: str, caching: bool, **overrides: object) -> LLMEngine:
    cfg = EngineConfig(model=model, progress=False, block_size=4, max_model_len=256, num_kv_blocks=200,
                       enable_prefix_caching=caching).with_(**overrides)
    return build_local_engine(cfg)


def run(engine: LLMEngine, got: Collector, rid: str, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    """Run one request to the end; returns the number of tokens each step computed."""
    engine.add_request(rid, prompt, params, got.sink(rid))
    computed = []
    while engine.has_work():
        computed.append(engine.step())
    return computed


def test_a_request_reuses_the_longest_cached_prefix_and_computes_only_the_rest(demo_dir: Path) -> None:
    engine = engine_for(str(demo_dir), True)
    got = Collector()
    first = list(range(3, 43))  # 40 tokens: 10 full blocks of 4
    assert run(engine, got, "a", first)[0] == 40
    assert engine.kv.prefix_stats.hits == 0
    # The same 32 tokens, then different ones: 8 blocks come from the cache, 10 tokens are computed.
    assert run(engine, got, "b", first[:32] + list(range(100, 110)))[0] == 10
    assert engine.kv.prefix_stats.hits == 32
    # The very same prompt: all but its last block (the last token's logits are needed), 4 tokens computed.
    assert run(engine, got, "c", first)[0] == 4
    assert got.tokens("c") == got.tokens("a")
    stats = engine.stats()
    assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (40 + 42 + 40, 32 + 36)
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_cached > 0  # finished: free, but still findable
    # A prompt differing in its first token shares no block, whatever follows (the hash is chained).
    assert run(engine, got, "d", [4, *first[1:]])[0] == 40
    assert engine.kv.prefix_stats.hits == 68


def test_caching_off_never_reuses(demo_dir: Path) -> None:
    engine = engine_for(str(demo_dir), False)
    got = Collector()
    prompt = list(range(3, 43))
    assert run(engine, got, "a", prompt)[0] == run(engine, got, "b", prompt)[0] == 40
    assert engine.stats().prefix_cache_queries_total == 0 and engine.stats().kv_blocks_cached == 0


def test_requests_arriving_together_compute_their_shared_prefix_once(demo_dir: Path) -> None:
    """A block is findable only after the step that computes it: the second of two requests sharing a system
    prompt waits one step for the first's prefill instead of computing the same blocks in the same step."""
    shared = list(range(3, 35))  # 32 tokens: 8 full blocks of 4
    prompts = [[*shared, 50, 51, 52], [*shared, 60, 61, 62, 63, 64]]
    computed: dict[bool, list[int]] = {}
    tokens: dict[bool, list[list[int]]] = {}
    for caching in (True, False):
        engine = engine_for(str(demo_dir), caching)
        got = Collector()
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, GREEDY, got.sink(str(i)))
        computed[caching] = [engine.step() for _ in range(2)]
        while engine.has_work():
            engine.step()
        tokens[caching] = [got.tokens(str(i)) for i in range(len(prompts))]
    assert computed[False][0] == len(prompts[0]) + len(prompts[1])  # off: both prefills in the first step
    # on: the first request's prefill alone, then its first decode and the second's uncached 5 tokens
    assert computed[True] == [len(prompts[0]), 1 + len(prompts[1]) - len(shared)]
    assert tokens[True] == tokens[False]


def test_cached_blocks_give_way_when_their_memory_is_needed(demo_dir: Path) -> None:
    engine = engine_for(str(demo_dir), True, num_kv_blocks=16)
    got = Collector()
    prompt = list(range(3, 43))  # 10 blocks + 3 for generated tokens
    run(engine, got, "a", prompt)
    assert engine.kv.allocator.num_cached == 12 and engine.kv.num_free == 16
    # 12 + 3 blocks: the 4 holding nothing cached go first, then "a"'s from its tail: only its first is left.
    run(engine, got, "other", list(range(200, 248)))
    assert run(engine, got, "again", prompt)[0] == 36 and engine.kv.prefix_stats.hits == 4
    assert got.tokens("again") == got.tokens("a")


@pytest.fixture(scope="module", params=["demo", WINDOW8])
def model_dir(request: pytest.FixtureRequest, demo_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[str]:
    if request.param == "demo":
        yield str(demo_dir)
    else:  # the sliding-window parity model: prompts much longer than its window of 8
        yield str(make_hf_checkpoint(tmp_path_factory.mktemp("window8"), **PARITY_CONFIGS[WINDOW8]).path)


def shared_prefix_prompts(seed: int, count: int, prefix_len: int, vocab: int = 90) -> list[list[int]]:
    """``count`` prompts sharing a first ``prefix_len`` tokens, then 1..12 tokens of their own; two of them
    also continue each other (a multi-turn history)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 13))] for _ in range(count)]
    prompts.append(prompts[0] + [rng.randrange(3, vocab) for _ in range(9)])
    return prompts


def generate_all(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, waves: int = 2
                 ) -> Collector:
    """Submit the prompts in ``waves`` (each runs to the end before the next starts, so later ones find the
    earlier ones' blocks cached), then everything once more, all at once."""
    got = Collector()
    size = -(-len(prompts) // waves)
    for w in range(waves):
        for i in range(w * size, min(len(prompts), (w + 1) * size)):
            engine.add_request(str(i), prompts[i], params, got.sink(str(i)))
        while engine.has_work():
            engine.step()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"again{i}", prompt, params, got.sink(f"again{i}"))
    while engine.has_work():
        engine.step()
    return got


def assert_same(on: Collector, off: Collector) -> None:
    assert on.outputs.keys() == off.outputs.keys()
    for rid in off.outputs:
        for want, got in zip(off.outputs[rid], on.outputs[rid], strict=True):
            assert [(d.index, d.token_ids) for d in got.outputs] == [(d.index, d.token_ids) for d in want.outputs]


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(n=3, max_tokens=8, temperature=0.9, seed=11,
                                                           ignore_eos=True)], ids=["greedy", "n3-seeded"])
def test_caching_on_equals_caching_off(model_dir: str, params: SamplingParams) -> None:
    prompts = shared_prefix_prompts(1, 6, prefix_len=30)
    on, off = engine_for(model_dir, True), engine_for(model_dir, False)
    assert_same(generate_all(on, prompts, params), generate_all(off, prompts, params))
    assert on.kv.prefix_stats.hits >= 20 * 7  # the second wave and the repeat ran mostly from the cache


def test_caching_on_equals_caching_off_under_preemption(model_dir: str) -> None:
    """A cache too small for the batch: sequences are preempted, and come back through the prefix cache."""
    prompts = shared_prefix_prompts(2, 6, prefix_len=20)
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=3, ignore_eos=True)
    on = engine_for(model_dir, True, num_kv_blocks=24, max_num_batched_tokens=32)
    off = engine_for(model_dir, False, num_kv_blocks=24, max_num_batched_tokens=32)
    assert_same(generate_all(on, prompts, params, waves=1), generate_all(off, prompts, params, waves=1))
    assert on.scheduler.num_preemptions > 0 and off.scheduler.num_preemptions > 0
    assert on.kv.prefix_stats.hits > 0 and on.kv.num_free == 24


def test_prompt_logprobs_are_exact_with_caching_on(model_dir: str) -> None:
    """echo + logprobs needs the logits of every prompt token: such a request computes its whole prompt (as
    vLLM does), so its prompt logprobs equal caching off, even when its prefix is cached."""
    prompts = shared_prefix_prompts(3, 3, prefix_len=24)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, echo=True, logprobs=2)
    on, off = engine_for(model_dir, True), engine_for(model_dir, False)
    got_on, got_off = generate_all(on, prompts, params), generate_all(off, prompts, params)
    assert_same(got_on, got_off)
    for rid, outs in got_off.outputs.items():
        want, got = outs[0].prompt_logprobs, got_on.outputs[rid][0].prompt_logprobs
        assert want is not None and got is not None and len(got) == len(want) > 24
        for w, g in zip(want[1:], got[1:], strict=True):
            assert w is not None and g is not None and g.token_id == w.token_id
            assert g.logprob == pytest.approx(w.logprob, rel=1e-6, abs=1e-6)
            assert [t for t, _ in g.top] == [t for t, _ in w.top]
    # The blocks these requests computed are cached all the same: a plain request after them reuses them.
    hits = on.kv.prefix_stats.hits
    run(on, Collector(), "plain", prompts[0])
    assert on.kv.prefix_stats.hits > hits
