"""The expert-parallel cluster on a real local Ray: one expert pool shared by several coordinators, parity with
the local engine, merging across coordinators, failures, shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import ray

from cluster.engine.client import EngineClient
from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import Continuation, RequestOutput, RequestResult
from cluster.engine_config import EngineConfig
from cluster.errors import ClusterStartError, RequestFailedError
from cluster.model.config import ModelConfig
from cluster.planning.plan import Hardware, plan_cpus
from tests.conftest import HFCheckpoint, cluster_config, make_hf_checkpoint, pool_config, process_environ
from tests.test_parity_hf import PARITY_CONFIGS, prompt_ids
from workers.cluster_engine import ClusterEngine, start_pool, stop_pool

pytestmark = pytest.mark.usefixtures("ray_local")
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
LENGTHS = (40, 7, 23, 1, 12)
E8, E4 = "e8-top2-gqa4-window8-untied-sharded", "e4-top1-gqa1-window16-tied-single"


def engines_share_one_api(local: EngineLoop, cluster: ClusterEngine) -> list[EngineClient]:
    """Checked by mypy, not at run time: both engines implement the EngineClient protocol."""
    return [local, cluster]


def assert_same_outputs(cluster: ClusterEngine, local: EngineLoop, vocab: int, seed: int = 100) -> None:
    prompts = [prompt_ids(vocab, n, seed=seed + n) for n in LENGTHS]
    for ours, theirs in zip(cluster.score(prompts), local.score(prompts), strict=True):
        assert (ours - theirs).abs().max().item() <= 1e-5
    got = cluster.generate(prompts, GREEDY)
    want = local.generate(prompts, GREEDY)
    assert [r.completions[0].token_ids for r in got] == [r.completions[0].token_ids for r in want]


def routed_since(before: list[list[int]], after: list[list[int]]) -> list[list[int]]:
    """Rows routed to each [layer][expert] between two readings of EngineStats.tokens_per_expert."""
    if not before:  # no step yet
        return after
    return [[a - b for a, b in zip(row_after, row_before, strict=True)]
            for row_after, row_before in zip(after, before, strict=True)]


@pytest.fixture(scope="module")
def parity_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[HFCheckpoint, EngineLoop]]]:
    models: dict[str, tuple[HFCheckpoint, EngineLoop]] = {}
    for name in (E8, E4):
        ckpt = make_hf_checkpoint(tmp_path_factory.mktemp("cluster-parity"), **PARITY_CONFIGS[name])
        engine_cfg = EngineConfig(model=str(ckpt.path), progress=False, num_kv_blocks=128, block_size=8)
        models[name] = (ckpt, EngineLoop.local(engine_cfg))
    yield models
    for _, local in models.values():
        local.shutdown()


@pytest.fixture(scope="module")
def pool2(parity_models: dict[str, tuple[HFCheckpoint, EngineLoop]]) -> Iterator[Any]:
    """An expert pool of the 8-expert model, 2 experts per worker (4 workers), shared by this module's tests. Its
    merge window is wide, so that merging shows even on a loaded machine."""
    pool = start_pool(parity_models[E8][1].engine.engine_cfg, pool_config(experts_per_worker=2, merge_wait_ms=20))
    yield pool
    stop_pool(pool)


def test_three_coordinators_on_one_pool_equal_the_local_engine(
        parity_models: dict[str, tuple[HFCheckpoint, EngineLoop]], pool2: Any) -> None:
    """Two coordinators (one on shared-memory links, one on process-group links) generate at the same time, and
    a third attaches while they do; each equals the local engine, token for token."""
    ckpt, local = parity_models[E8]
    vocab, cfg = ckpt.config["vocab_size"], local.engine.engine_cfg
    first = ClusterEngine.start(cfg, cluster_config(), pool=pool2)
    second = ClusterEngine.start(cfg, cluster_config(link="pg"), pool=pool2)
    third: list[ClusterEngine] = []
    errors: list[BaseException] = []

    def check(engine: ClusterEngine, seed: int) -> None:
        try:
            assert_same_outputs(engine, local, vocab, seed)
        except BaseException as err:
            errors.append(err)

    try:
        assert first.describe()["links"] == ["shm"] * 4 and second.describe()["links"] == ["pg"] * 4
        before = {"cluster": first.stats().tokens_per_expert, "local": local.stats().tokens_per_expert}
        check(first, 100)
        # The same requests routed the same rows to the same experts, layer by layer, as in the local engine.
        routed = routed_since(before["cluster"], first.stats().tokens_per_expert)
        assert routed == routed_since(before["local"], local.stats().tokens_per_expert)
        assert len(routed) == ckpt.config["num_hidden_layers"] and all(min(layer) > 0 for layer in routed)
        running = [threading.Thread(target=check, args=pair) for pair in ((first, 200), (second, 300))]
        for thread in running:
            thread.start()
        third.append(ClusterEngine.start(cfg, cluster_config(), pool=pool2))  # attaches while the others generate
        check(third[0], 400)
        for thread in running:
            thread.join()
        assert not errors, errors
        pool = ray.get(pool2.describe.remote())
        assert len(pool["workers"]) == 4 and len(pool["coordinators"]) >= 3
    finally:
        for engine in (first, second, *third):
            engine.shutdown()
    assert ray.get(pool2.describe.remote())["coordinators"] == []
    # The pool outlived its coordinators: every worker still serves, and dropped every link it had.
    for stats in ray.get(pool2.worker_stats.remote()):
        assert stats["links_closed"] == stats["links_opened"] >= 3


def rows_per_call(pool: Any, run: Any) -> float:
    """Rows per grouped expert call over the pool's workers while ``run()`` runs."""
    def totals() -> tuple[int, int]:
        stats = ray.get(pool.worker_stats.remote())
        return sum(s["rows"] for s in stats), sum(s["calls"] for s in stats)

    rows, calls = totals()
    run()
    rows_after, calls_after = totals()
    return (rows_after - rows) / (calls_after - calls)


def test_rows_of_two_coordinators_merge_into_one_expert_call(
        parity_models: dict[str, tuple[HFCheckpoint, EngineLoop]], pool2: Any) -> None:
    """At the same batch per coordinator, two coordinators give each expert call about twice the rows of one."""
    cfg = parity_models[E8][1].engine.engine_cfg
    engines = [ClusterEngine.start(cfg, cluster_config(), pool=pool2) for _ in range(2)]
    batch = [prompt_ids(96, 6, seed=s) for s in range(8)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    def together() -> None:
        threads = [threading.Thread(target=e.generate, args=(batch, params)) for e in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    try:
        alone = rows_per_call(pool2, lambda: engines[0].generate(batch, params))
        merged = rows_per_call(pool2, together)
        print(f"\nrows per expert call: 1 coordinator {alone:.1f}, 2 coordinators {merged:.1f}")
        assert merged >= 1.5 * alone
    finally:
        for engine in engines:
            engine.shutdown()


@pytest.mark.parametrize("micro_batches", [1, 2, 3])
def test_micro_batches_equal_the_serial_schedule(parity_models: dict[str, tuple[HFCheckpoint, EngineLoop]],
                                                pool2: Any, micro_batches: int) -> None:
    """A step split into 1, 2 or 3 pipelined micro-batches gives the local engine's tokens, with prefill chunked
    (16 tokens a step), a sliding window (8) and a KV cache too small for all sequences at once (preemption)."""
    ckpt, _ = parity_models[E8]
    cfg = parity_models[E8][1].engine.engine_cfg.with_(max_num_batched_tokens=16, num_kv_blocks=12)
    local = EngineLoop.local(cfg)
    cluster = ClusterEngine.start(cfg, cluster_config(micro_batches=micro_batches), pool=pool2)
    try:
        assert_same_outputs(cluster, local, ckpt.config["vocab_size"], seed=500 + micro_batches)
        assert cluster.stats().num_preemptions > 0 and local.stats().num_preemptions > 0
    finally:
        cluster.shutdown()
        local.shutdown()


def test_two_micro_batches_are_really_used(parity_models: dict[str, tuple[HFCheckpoint, EngineLoop]],
                                           pool2: Any) -> None:
    """Configured with 2 micro-batches, a coordinator splits its steps in two (its stats say so: this fails if
    micro-batching is silently off) and gives the serial local engine's tokens; over gloo process groups here,
    which it reports per link."""
    ckpt, local = parity_models[E8]
    cluster = ClusterEngine.start(local.engine.engine_cfg, cluster_config(micro_batches=2, link="pg"), pool=pool2)
    try:
        assert cluster.describe()["link_backends"] == ["gloo"] * 4
        assert_same_outputs(cluster, local, ckpt.config["vocab_size"], seed=700)
        stats = cluster.stats()
        assert stats.micro_batch_steps.get(2, 0) >= 16 and set(stats.micro_batch_steps) <= {1, 2}  # 16 tokens each
        assert sum(stats.micro_batch_steps.values()) == stats.num_steps
    finally:
        cluster.shutdown()
    assert set(local.stats().micro_batch_steps) == {1}  # the local engine has nothing to overlap


def test_prefix_caching_in_the_cluster_equals_caching_off(parity_models: dict[str, tuple[HFCheckpoint, EngineLoop]],
                                                         pool2: Any) -> None:
    """A coordinator with prefix caching on (the default), the sliding-window model (8), a cache small enough to
    preempt, prompts sharing a long prefix sent twice: greedy tokens, seeded n=2 samples and prompt logprobs equal
    the local engine with caching off."""
    from tests.test_prefix_cache import shared_prefix_prompts

    cfg = parity_models[E8][1].engine.engine_cfg.with_(max_num_batched_tokens=32, num_kv_blocks=24)
    local = EngineLoop.local(cfg.with_(enable_prefix_caching=False))
    cluster = ClusterEngine.start(cfg, cluster_config(), pool=pool2)
    prompts = shared_prefix_prompts(7, 5, prefix_len=30)
    try:
        for params in (GREEDY, SamplingParams(n=2, max_tokens=8, temperature=0.9, seed=5, ignore_eos=True),
                       SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, echo=True, logprobs=1)):
            want = local.generate(prompts, params)
            for _ in range(2):  # the second time, every prefix is cached
                got = cluster.generate(prompts, params)
                assert [[c.token_ids for c in r.completions] for r in got] == \
                    [[c.token_ids for c in r.completions] for r in want]
                for ours, theirs in zip(got, want, strict=True):
                    if theirs.prompt_logprobs is not None:
                        assert ours.prompt_logprobs is not None
                        assert [t.logprob if t else None for t in ours.prompt_logprobs] == pytest.approx(
                            [t.logprob if t else None for t in theirs.prompt_logprobs], abs=1e-5)
        stats = cluster.stats()
        assert stats.prefix_cache_hits_total > 0 and stats.num_preemptions > 0
    finally:
        cluster.shutdown()
        local.shutdown()


def test_one_expert_per_worker_two_coordinators_at_once(parity_models: dict[str, tuple[HFCheckpoint, EngineLoop]]
                                                 ) -> None:
    """One expert per worker, with 1 KiB link slots so that most messages (and their results) travel in buffers
    of their own, two coordinators at once."""
    ckpt, local = parity_models[E4]
    pool = start_pool(local.engine.engine_cfg, pool_config(experts_per_worker=1, link_slot_bytes=1024))
    engines = [ClusterEngine.start(local.engine.engine_cfg, cluster_config(), pool=pool) for _ in range(2)]
    errors: list[BaseException] = []

    def check(engine: ClusterEngine, seed: int) -> None:
        try:
            assert_same_outputs(engine, local, ckpt.config["vocab_size"], seed)
        except BaseException as err:
            errors.append(err)

    try:
        assert len(ray.get(pool.describe.remote())["workers"]) == 4
        running = [threading.Thread(target=check, args=(engine, 100 + i)) for i, engine in enumerate(engines)]
        for thread in running:
            thread.start()
        for thread in running:
            thread.join()
        assert not errors, errors
    finally:
        for engine in engines:
            engine.shutdown()
        stop_pool(pool)


@pytest.mark.slow
def test_workers_hosting_unequal_numbers_of_experts(parity_models: dict[str, tuple[HFCheckpoint, EngineLoop]]
                                                   ) -> None:
    ckpt, local = parity_models[E8]
    uneven = ClusterEngine.start(local.engine.engine_cfg, cluster_config(), pool_config(experts_per_worker=3))
    try:  # experts [0, 1, 2], [3, 4, 5], [6, 7]
        assert [w["experts"] for w in uneven.describe()["pool"]["workers"]] == [[0, 1, 2], [3, 4, 5], [6, 7]]
        assert_same_outputs(uneven, local, ckpt.config["vocab_size"])
    finally:
        uneven.shutdown()


def test_the_cpu_plans_shape_runs_with_its_wait_policy_and_the_local_engines_outputs(
        parity_models: dict[str, tuple[HFCheckpoint, EngineLoop]]) -> None:
    """`moe-cluster plan`'s shape for a 2-core CPU node, started from its options as serve starts it: two 1-thread
    workers of 4 experts and a 1-thread coordinator, micro-batches from CPU_MICRO_BATCH_MIN_TOKENS tokens; the
    local engine's outputs. Started with the wait policy the plan gives processes of several threads (16 cores: 2
    each, passive), OMP_WAIT_POLICY=PASSIVE is in the environment of the coordinator's and the workers' processes,
    set through their Ray runtime_env."""
    ckpt, local = parity_models[E8]
    cfg = ModelConfig.from_file(ckpt.path)
    plan = plan_cpus(cfg, Hardware("cpu", 2, 24))
    assert [len(w) for w in plan.workers] == [4, 4] and plan.threads == {"coordinator": 1, "worker": 1}
    assert plan.cluster_options["coordinator_omp_wait_policy"] is None and plan.cluster_options["micro_batches"] == 0
    wide = plan_cpus(cfg, Hardware("cpu", 16, 24))
    policy = wide.cluster_options["coordinator_omp_wait_policy"]
    assert policy == wide.pool_options["worker_omp_wait_policy"] == "passive"
    cluster = ClusterEngine.start(local.engine.engine_cfg,
                                  cluster_config(**plan.cluster_options | {"coordinator_omp_wait_policy": policy}),
                                  pool_config(**plan.pool_options | {"worker_omp_wait_policy": policy}))
    try:
        info = cluster.describe()
        pids = [info["pid"]] + [w["pid"] for w in info["pool"]["workers"]]
        assert len(pids) == 3
        for pid in pids:
            assert process_environ(pid).get("OMP_WAIT_POLICY") == "PASSIVE", pid
        assert_same_outputs(cluster, local, ckpt.config["vocab_size"])
    finally:
        cluster.shutdown()


def test_workers_read_only_their_experts_shards(parity_models: dict[str, tuple[HFCheckpoint, EngineLoop]],
                                               pool2: Any) -> None:
    ckpt, _ = parity_models[E8]
    index = json.loads((ckpt.path / "model.safetensors.index.json").read_text())["weight_map"]
    for worker in ray.get(pool2.describe.remote())["workers"]:
        own = {f for name, f in index.items() if ".experts." in name and int(name.split(".")[5]) in worker["experts"]}
        assert set(worker["files_opened"]) == own


def test_bad_request_through_the_cluster_is_a_value_error(
        parity_models: dict[str, tuple[HFCheckpoint, EngineLoop]], pool2: Any) -> None:
    cfg = parity_models[E8][1].engine.engine_cfg.with_(max_model_len=64)
    cluster = ClusterEngine.start(cfg, cluster_config(), pool=pool2)
    try:
        with pytest.raises(ValueError, match="prompt token id 999 at position 0 is outside the vocabulary"):
            cluster.generate([[999]], GREEDY)
        assert cluster.health()["alive"]
        assert cluster.generate([[1, 2]], GREEDY)[0].completions[0].token_ids
    finally:
        cluster.shutdown()


def test_cluster_stream_takes_the_pace_and_the_continuation_of_the_serve_path(
        parity_models: dict[str, tuple[HFCheckpoint, EngineLoop]], pool2: Any) -> None:
    """ClusterEngine.stream_batches with interval_s and continuation, as a Serve replica calls an engine: paced by
    an interval longer than the whole generation, the first batch comes at once and the rest in one final batch
    without waiting for the interval; taken whole (``whole=True``, through the Coordinator actor) it is two
    batches; a seeded n=2 request the local engine started, cut after its 4th report and continued on the cluster,
    ends exactly as the uninterrupted request on the local engine."""
    from tests.test_continuation import received

    ckpt, local = parity_models[E8]
    prompt = prompt_ids(ckpt.config["vocab_size"], 9, seed=3)
    params = SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=11, ignore_eos=True, logprobs=1)
    interval = 30.0
    cluster = ClusterEngine.start(local.engine.engine_cfg, cluster_config(), pool=pool2)

    async def batches(engine: EngineClient, interval_s: Callable[[], float] | None = None,
                      continuation: Continuation | None = None, whole: bool = False,
                      ) -> tuple[list[list[RequestOutput]], float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        got = [b async for b in engine.stream_batches(prompt, params, interval_s=interval_s,
                                                         continuation=continuation, whole=whole)]
        return got, loop.time() - started

    try:
        paced, elapsed = asyncio.run(batches(cluster, lambda: interval))
        assert elapsed < interval and len(paced) <= 2 and paced[-1][-1].finished
        whole = [out for batch in asyncio.run(batches(local))[0] for out in batch]
        assert len(whole) > 4
        want = RequestResult.fold(whole)
        assert [c.token_ids for c in RequestResult.fold([o for b in paced for o in b]).completions] == \
            [c.token_ids for c in want.completions]
        taken_whole, _ = asyncio.run(batches(cluster, whole=True))
        assert len(taken_whole) == 2 and taken_whole[-1][-1].finished
        assert [c.token_ids for c in RequestResult.fold([o for b in taken_whole for o in b]).completions] == \
            [c.token_ids for c in want.completions]
        after, _ = asyncio.run(batches(cluster, continuation=received(whole[:4], params.n)))
        joined = RequestResult.fold(whole[:4] + [out for batch in after for out in batch])
        assert [(c.token_ids, c.text, c.finish_reason) for c in joined.completions] == \
            [(c.token_ids, c.text, c.finish_reason) for c in want.completions]
        assert joined.num_generated_tokens == want.num_generated_tokens == 24
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_worker_killed_mid_generation_fails_requests_naming_it(hf_small: HFCheckpoint) -> None:
    """With recovery off, a dead worker fails the running requests with an error naming it, at once."""
    before = held()
    cluster = ClusterEngine.start(EngineConfig(model=str(hf_small.path), progress=False, num_kv_blocks=256,
                                               max_model_len=512),
                                  cluster_config(recover_workers=False), pool_config(experts_per_worker=2))
    try:
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                cluster.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
                result["error"] = None
            except Exception as err:
                result["error"] = err

        thread = threading.Thread(target=run)
        thread.start()
        while cluster.stats().num_running == 0:
            time.sleep(0.05)
        time.sleep(0.3)
        killed_at = time.monotonic()
        killed = cluster.describe()["pool"]["workers"][1]
        os.kill(killed["pid"], signal.SIGKILL)
        thread.join(timeout=60)
        assert not thread.is_alive()
        err = result["error"]
        assert isinstance(err, RequestFailedError)
        assert f"expert worker 1 (experts [2, 3], generation 0, pid {killed['pid']}" in str(err)
        assert time.monotonic() - killed_at < 20
        assert not cluster.health()["alive"]
    finally:
        cluster.shutdown()
    assert_released(before)


def test_missing_resources_fail_fast_with_what_is_missing(hf_small: HFCheckpoint) -> None:
    before = held()
    started = time.monotonic()
    with pytest.raises(ClusterStartError) as err:
        ClusterEngine.start(EngineConfig(model=str(hf_small.path), progress=False),
                            cluster_config(), pool_config(use_gpus=True, placement_timeout_s=3))
    assert time.monotonic() - started < 20
    text = str(err.value)
    assert "could not place the pool's 8 expert workers within 3s" in text and "missing: GPU 8" in text
    assert_released(before)


def held() -> tuple[float, set[str]]:
    """CPUs and GPUs held now, and the placement groups not removed."""
    free, total = (sum(r.get(k, 0) for k in ("CPU", "GPU")) for r in (ray.available_resources(),
                                                                       ray.cluster_resources()))
    return total - free, {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}


def assert_released(before: tuple[float, set[str]]) -> None:
    """Every CPU, GPU and placement group taken since ``before = held()`` is back (what earlier tests still held
    then may have been released since)."""
    def released(now: tuple[float, set[str]]) -> bool:
        return now[0] <= before[0] and now[1] <= before[1]

    deadline = time.monotonic() + 20
    while not released(held()) and time.monotonic() < deadline:
        time.sleep(0.3)
    now = held()
    assert now[0] <= before[0], f"{now[0] - before[0]} CPUs/GPUs still held after shutdown"
    assert now[1] <= before[1], f"placement groups {now[1] - before[1]} still there"


def test_shutdown_releases_every_actor_and_the_placement_group(hf_small: HFCheckpoint) -> None:
    before = held()
    cluster = ClusterEngine.start(EngineConfig(model=str(hf_small.path), progress=False, num_kv_blocks=32),
                                  cluster_config(), pool_config(experts_per_worker=4))
    assert cluster.generate([[9, 10]], GREEDY)[0].completions[0].token_ids
    workers = cluster.describe()["pool"]["workers"]
    cluster.shutdown()
    assert_released(before)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(cluster.coordinator.health.remote(), timeout=10)
    deadline = time.monotonic() + 15
    while any(pid_alive(w["pid"]) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(pid_alive(w["pid"]) for w in workers), "an expert worker process outlived the shutdown"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
