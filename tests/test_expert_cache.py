"""The per-worker expert cache (workers/expert_cache.py) and the speculative prefetch (cluster/moe/prefetch.py):
exact against all-resident experts, at every cache size, with and without hints (issue 23)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from cluster.engine.loader import build_engine, build_local_engine
from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import EngineConfig
from cluster.model.checkpoint import Checkpoint, load_expert_weights
from cluster.model.config import ModelConfig
from cluster.model.demo import TRAINED_DEMO
from cluster.moe.expert_map import ExpertMap
from cluster.moe.prefetch import decode_hint, encode_hint, hints_per_worker, predict_experts
from workers.expert_cache import (
    CachedExperts,
    CacheStats,
    cached_local_moe,
    engine_cache,
    install_prefetcher,
    load_cached_experts,
)

PROMPTS = ["And the word of the LORD came unto Jonah", "So the shipmen were afraid, and cried",
           "Then Jonah prayed unto the LORD his God out of the fish's belly"]


def random_calls(cfg: ModelConfig, calls: int, seed: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(layer, rows grouped by expert, rows per expert): mostly decode-sized calls, some expert-heavy ones."""
    rng = random.Random(seed)
    out = []
    for _ in range(calls):
        layer = rng.randrange(cfg.num_layers)
        counts = [0] * cfg.num_experts
        for _ in range(rng.choice([1, 1, 2, 5, 12])):  # tokens, top-k experts each
            for e in rng.sample(range(cfg.num_experts), cfg.experts_per_token):
                counts[e] += 1
        rows = torch.randn(sum(counts), cfg.hidden_size, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        out.append((layer, rows, torch.tensor(counts)))
    return out


@pytest.mark.parametrize("model", ["trained", "parity"])
def test_cached_experts_compute_the_same_bits_as_all_resident_at_every_size(model: str, hf_small: object) -> None:
    model_dir = TRAINED_DEMO if model == "trained" else hf_small.path  # type: ignore[attr-defined]
    cfg = ModelConfig.from_file(Path(model_dir) / "config.json")
    every = (tuple(range(cfg.num_experts)),) * cfg.num_layers
    resident = load_expert_weights(Checkpoint(model_dir), cfg, range(cfg.num_experts), torch.float32, progress=False)
    calls = random_calls(cfg, 40, seed=len(model))
    rng = random.Random(1)
    for capacity in range(1, cfg.num_experts):
        stats = CacheStats()
        cache = load_cached_experts(model_dir, cfg, every, capacity, torch.float32, torch.device("cpu"), stats)
        for layer, rows, counts in calls:
            if capacity > 2 and rng.random() < 0.5:  # a hint, right or wrong: never changes a result
                cache.hint(layer, rng.sample(range(cfg.num_experts), 3))
            assert torch.equal(cache.run_grouped(layer, rows, counts), resident.run_grouped(layer, rows, counts))
            assert len(cache.resident_experts(layer)) <= capacity
        cache.close()
        # the cache was really used: K/E of the memory, and loads on misses
        assert cache.nbytes * cfg.num_experts == resident.nbytes * capacity
        assert stats.misses > 0 and stats.loads >= stats.misses and stats.hits > 0
        assert stats.bytes_loaded == stats.loads * resident.nbytes // (cfg.num_layers * cfg.num_experts)


def test_a_call_needing_more_experts_than_slots_runs_them_in_turns() -> None:
    cfg = ModelConfig.from_file(Path(TRAINED_DEMO) / "config.json")
    every = (tuple(range(cfg.num_experts)),) * cfg.num_layers
    resident = load_expert_weights(Checkpoint(TRAINED_DEMO), cfg, range(cfg.num_experts), torch.float32,
                                   progress=False)
    cache = load_cached_experts(TRAINED_DEMO, cfg, every, 1, torch.float32, torch.device("cpu"))
    counts = torch.tensor([3, 1, 0, 2, 1, 1, 4, 1])
    rows = torch.randn(int(counts.sum()), cfg.hidden_size)
    cache.hint(2, [1, 2])  # a hint (the slot's only, for expert 1) is consumed by the call: its misses get the slot
    assert torch.equal(cache.run_grouped(2, rows, counts), resident.run_grouped(2, rows, counts))
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.prefetch_issued, stats.prefetch_used) == (1, 6, 1, 1)
    assert cache.resident_experts(2) == [7] and stats.loads == 7
    cache.close()


def test_hints_travel_as_msgpack_and_reach_every_replica() -> None:
    assert decode_hint(encode_hint(3, [1, 5])) == (3, [1, 5])
    with pytest.raises(ValueError, match="malformed prefetch hint"):
        decode_hint(b"\x93\x01\x02")
    expert_map = ExpertMap((((0, 1, 2), (2, 3)),), 4)
    assert hints_per_worker(expert_map, 0, [2, 3]) == [[2], [2, 3]]
    x = torch.randn(5, 8)
    gate = torch.zeros(4, 8)
    gate[1] = 1.0
    gate[3] = 0.5
    assert predict_experts(x.abs(), torch.ones(8), gate, 1e-5, 2) == [1, 3]


def greedy(engine_loop: EngineLoop, max_tokens: int) -> list[list[int]]:
    results = engine_loop.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return [r.completions[0].token_ids for r in results]


@pytest.fixture(scope="module")
def all_resident_tokens() -> list[list[int]]:
    loop = EngineLoop(lambda: build_local_engine(engine_config()))
    try:
        return greedy(loop, 24)
    finally:
        loop.shutdown()


def engine_config() -> EngineConfig:
    return EngineConfig(model=str(TRAINED_DEMO), progress=False, block_size=8, max_model_len=256)


@pytest.mark.parametrize(("capacity", "lookahead"), [(1, 0), (4, 0), (4, 1), (2, 2), (7, 1)])
def test_greedy_tokens_with_a_cache_equal_all_resident(capacity: int, lookahead: int,
                                                       all_resident_tokens: list[list[int]]) -> None:
    stats = CacheStats()

    def build() -> object:
        engine = build_engine(engine_config(), cached_local_moe(capacity, stats))
        if lookahead:
            install_prefetcher(engine, lookahead)
        return engine

    loop = EngineLoop(build)  # type: ignore[arg-type]
    try:
        assert greedy(loop, 24) == all_resident_tokens
        cache = engine_cache(loop.engine)
    finally:
        loop.shutdown()
    assert isinstance(cache, CachedExperts) and cache.capacity == capacity
    assert stats.misses > 0  # the experts came through the cache
    assert (stats.prefetch_issued > 0) == bool(lookahead)
    assert stats.prefetch_used + stats.prefetch_wasted <= stats.prefetch_issued


def test_greedy_tokens_of_a_parity_model_with_a_cache_equal_all_resident(hf_small: object) -> None:
    """The transformers-built parity model (tests/conftest.py): 2 of 8 experts per layer, prefetch 2 layers ahead."""
    cfg = EngineConfig(model=str(hf_small.path), progress=False, block_size=8, max_model_len=128)  # type: ignore[attr-defined]
    prompts = [[5, 17, 33, 40, 8], [60, 61, 3], [9] * 12]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    resident = EngineLoop(lambda: build_local_engine(cfg))
    stats = CacheStats()

    def build() -> object:
        engine = build_engine(cfg, cached_local_moe(2, stats))
        install_prefetcher(engine, 2)
        return engine

    cached = EngineLoop(build)  # type: ignore[arg-type]
    try:
        expected = [r.completions[0].token_ids for r in resident.generate(prompts, params)]
        assert [r.completions[0].token_ids for r in cached.generate(prompts, params)] == expected
    finally:
        resident.shutdown()
        cached.shutdown()
    assert stats.misses > 0 and stats.prefetch_issued > 0


@pytest.mark.slow
@pytest.mark.parametrize("capacity", range(1, 8))
@pytest.mark.parametrize("lookahead", [0, 1, 2])
def test_greedy_tokens_at_every_cache_size_equal_all_resident(capacity: int, lookahead: int,
                                                              all_resident_tokens: list[list[int]]) -> None:
    test_greedy_tokens_with_a_cache_equal_all_resident(capacity, lookahead, all_resident_tokens)
