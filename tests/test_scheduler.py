"""Block allocator and scheduler: property-based invariants, chunked prefill, fairness, preemption, sharing."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.engine.llm_engine import LLMEngine
from cluster.engine.loader import build_local_engine
from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import RequestOutput
from cluster.engine_config import EngineConfig
from cluster.model.kv_cache import BlockAllocator, blocks_for


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_blocks=st.integers(1, 64))
def test_allocator_never_leaks_over_10000_random_operations(seed: int, num_blocks: int) -> None:
    """Random allocate / share (fork) / release / preempt (release all) of sequences' block tables."""
    rng = random.Random(seed)
    alloc = BlockAllocator(num_blocks)
    tables: list[list[int]] = []
    for step in range(10_000):
        op = rng.random()
        if op < 0.4 and alloc.num_free:
            if tables and rng.random() < 0.5:
                rng.choice(tables).append(alloc.allocate())
            else:
                tables.append([alloc.allocate()])
        elif op < 0.55 and tables:  # fork: a new table sharing every block
            parent = rng.choice(tables)
            for block in parent:
                alloc.share(block)
            tables.append(list(parent))
        elif op < 0.7 and tables:  # copy-on-write of a table's last block
            table = rng.choice(tables)
            if table and alloc.refcount(table[-1]) > 1 and alloc.num_free:
                new = alloc.allocate()
                alloc.release(table[-1])
                table[-1] = new
        elif tables:  # finish or preempt: release everything
            alloc.release_all(tables.pop(rng.randrange(len(tables))))
        if step % 25 and step != 9_999:
            continue
        # Invariant: reference counts equal the number of tables holding each block; free iff zero.
        held: dict[int, int] = {}
        for table in tables:
            for block in table:
                held[block] = held.get(block, 0) + 1
        assert all(alloc.refcount(b) == held.get(b, 0) for b in range(num_blocks))
        assert alloc.num_free == num_blocks - len(held)
    for table in tables:
        alloc.release_all(table)
    assert alloc.num_free == num_blocks


def make_engine(demo_dir: Path, **overrides: object) -> LLMEngine:
    cfg = EngineConfig(model=str(demo_dir), progress=False, block_size=4, max_model_len=512).with_(**overrides)
    return build_local_engine(cfg)


class Collector:
    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = {}

    def sink(self, rid: str) -> Callable[[RequestOutput], None]:
        return lambda out: self.outputs.setdefault(rid, []).append(out)

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs.get(rid, []) for d in o.outputs for t in d.token_ids]


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def test_long_prompt_is_chunked_and_does_not_stall_decodes(demo_dir: Path) -> None:
    engine = make_engine(demo_dir, max_num_batched_tokens=24, num_kv_blocks=200)
    got = Collector()
    for i in range(3):
        engine.add_request(f"short{i}", [5 + i, 6, 7], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                           got.sink(f"short{i}"))
    engine.step()  # the short prompts prefill
    engine.add_request("long", list(range(3, 203)), GREEDY, got.sink("long"))
    steps_for_long = 0
    while not got.outputs.get("long"):
        before = [len(got.tokens(f"short{i}")) for i in range(3)]
        engine.step()
        steps_for_long += 1
        after = [len(got.tokens(f"short{i}")) for i in range(3)]
        assert all(a == b + 1 for a, b in zip(after, before, strict=True)), "a decode was stalled"
    assert steps_for_long >= 200 // 24  # the 200-token prompt went in chunks within the token budget


def test_first_come_first_served_no_overtaking(demo_dir: Path) -> None:
    """While the head of the queue does not fit, a later request that would fit waits too."""
    engine = make_engine(demo_dir, num_kv_blocks=40, max_num_batched_tokens=256)
    got = Collector()
    engine.add_request("big", list(range(3, 103)), SamplingParams(max_tokens=50, ignore_eos=True), got.sink("big"))
    engine.step()  # "big" holds 26 of the 40 blocks
    engine.add_request("long", list(range(103, 183)), GREEDY, got.sink("long"))  # needs 20 blocks: does not fit
    engine.add_request("short", [7, 8], GREEDY, got.sink("short"))  # needs 1 block: would fit
    for _ in range(3):
        engine.step()
    assert "long" not in got.outputs and "short" not in got.outputs  # nobody overtook the head of the queue
    assert [s.request.request_id for s in engine.scheduler.waiting] == ["long", "short"]
    engine.abort("big")
    engine.step()
    scheduled = {rid: engine.requests[rid].metrics.first_scheduled_time for rid in ("long", "short")}
    assert scheduled["long"] is not None and scheduled["short"] is not None
    assert scheduled["long"] <= scheduled["short"]


def test_preemption_recomputes_and_gives_the_same_tokens(demo_dir: Path) -> None:
    alone = make_engine(demo_dir, num_kv_blocks=200)
    tight = make_engine(demo_dir, num_kv_blocks=14, max_num_batched_tokens=64)  # 56 tokens of cache
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 800) for _ in range(rng.randrange(2, 12))] for _ in range(6)]
    params = SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True)
    want, got = Collector(), Collector()
    for i, p in enumerate(prompts):
        alone.add_request(str(i), p, params, want.sink(str(i)))
        while alone.has_work():
            alone.step()
        tight.add_request(str(i), p, params, got.sink(str(i)))
    while tight.has_work():
        tight.step()
        assert tight.kv.num_used <= 14
    assert tight.scheduler.num_preemptions > 0
    for i in range(len(prompts)):
        assert got.tokens(str(i)) == want.tokens(str(i))  # seeded sampling continues the same stream
    assert tight.kv.num_free == 14


def test_parallel_samples_share_the_prompt_blocks(demo_dir: Path) -> None:
    engine = make_engine(demo_dir, num_kv_blocks=200)
    got = Collector()
    prompt = list(range(3, 43))  # 40 tokens = 10 full blocks of 4
    engine.add_request("n4", prompt, SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=1, ignore_eos=True),
                       got.sink("n4"))
    engine.step()  # prefill, fork, first tokens
    seqs = engine.requests["n4"].seqs
    assert len(seqs) == 4
    shared = set(seqs[0].block_table[:10])
    assert all(set(s.block_table[:10]) == shared for s in seqs)
    assert all(engine.kv.refcount(b) == 4 for b in shared)
    used_shared = engine.kv.num_used
    assert used_shared == blocks_for(40, 4)  # one copy of the prompt for all four samples
    while engine.has_work():
        engine.step()
        # Unshared, four samples of 40+ tokens would need at least 4 * 11 blocks.
        assert engine.kv.num_used <= 10 + 4 * 2
    outs = got.outputs["n4"]
    assert outs[-1].finished and sorted({d.index for o in outs for d in o.outputs}) == [0, 1, 2, 3]
    assert engine.kv.num_free == 200


def test_finished_and_aborted_requests_free_blocks_at_once(demo_dir: Path) -> None:
    engine = make_engine(demo_dir, num_kv_blocks=100)
    got = Collector()
    engine.add_request("x", list(range(3, 30)), SamplingParams(max_tokens=50, ignore_eos=True), got.sink("x"))
    # y shares no block with x (a shared prefix would make it wait a step for x's prefill)
    engine.add_request("y", list(range(40, 47)), SamplingParams(max_tokens=2, ignore_eos=True), got.sink("y"))
    engine.step()
    engine.step()  # y is finished now
    assert got.outputs["y"][-1].finished
    used = engine.kv.num_used
    assert used == len(engine.requests["x"].seqs[0].block_table)
    assert engine.abort("x")
    assert engine.kv.num_used == 0 and not engine.has_work()
    final = got.outputs["x"][-1]
    assert final.finished and final.outputs[0].finish_reason == "abort"


def test_queue_limit_refuses_new_requests(demo_dir: Path) -> None:
    from cluster.errors import QueueFullError

    engine = make_engine(demo_dir, max_queue_len=2, num_kv_blocks=50)
    for i in range(2):
        engine.add_request(str(i), [5, 6], GREEDY, lambda out: None)
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.add_request("late", [5, 6], GREEDY, lambda out: None)
