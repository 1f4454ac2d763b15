"""The expert-parallel cluster on a real local Ray: parity with the local engine, failures, shutdown."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from cluster.cluster_engine import ClusterEngine
from cluster.engine_config import EngineConfig
from cluster.engine_loop import LocalEngine
from cluster.errors import ClusterStartError, EngineDeadError, RequestFailedError
from cluster.sampling import SamplingParams
from tests.conftest import HFCheckpoint, cluster_config, make_hf_checkpoint
from tests.test_parity_hf import PARITY_CONFIGS, prompt_ids

pytestmark = pytest.mark.usefixtures("ray_local")
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
LENGTHS = (40, 7, 23, 1)


def assert_same_outputs(cluster: ClusterEngine, local: LocalEngine, vocab: int) -> None:
    prompts = [prompt_ids(vocab, n, seed=100 + n) for n in LENGTHS]
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
def parity_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[HFCheckpoint, LocalEngine]]]:
    models: dict[str, tuple[HFCheckpoint, LocalEngine]] = {}
    for name in ("e8-top2-gqa4-window8-untied-sharded", "e4-top1-gqa1-window16-tied-single"):
        ckpt = make_hf_checkpoint(tmp_path_factory.mktemp("cluster-parity"), **PARITY_CONFIGS[name])
        engine_cfg = EngineConfig(model=str(ckpt.path), progress=False, num_kv_blocks=128, block_size=8)
        models[name] = (ckpt, LocalEngine.from_config(engine_cfg))
    yield models
    for _, local in models.values():
        local.shutdown()


@pytest.mark.parametrize(("name", "experts_per_worker", "exchange", "inline_bytes"), [
    ("e8-top2-gqa4-window8-untied-sharded", 1, "auto", 16 * 1024),
    ("e8-top2-gqa4-window8-untied-sharded", 2, "collective", 16 * 1024),
    ("e8-top2-gqa4-window8-untied-sharded", 8, "auto", 16 * 1024),
    ("e4-top1-gqa1-window16-tied-single", 1, "sparse", 0),  # counts and rows always as two messages
    ("e4-top1-gqa1-window16-tied-single", 3, "auto", 2048),  # 16 rows inline: decodes inline, prefills not
])
def test_cluster_equals_local_engine(parity_models: dict[str, tuple[HFCheckpoint, LocalEngine]], name: str,
                                     experts_per_worker: int, exchange: str, inline_bytes: int) -> None:
    ckpt, local = parity_models[name]
    cluster = ClusterEngine.start(local.engine.engine_cfg, cluster_config(
        experts_per_worker=experts_per_worker, exchange=exchange, inline_message_bytes=inline_bytes))
    try:
        num_experts = ckpt.config.get("num_local_experts", 8)
        assert len(cluster.info["workers"]) == -(-num_experts // experts_per_worker)
        before = {"cluster": cluster.stats().tokens_per_expert, "local": local.stats().tokens_per_expert}
        assert_same_outputs(cluster, local, ckpt.config["vocab_size"])
        # The same requests routed the same rows to the same experts, layer by layer, in the cluster as in the
        # local engine (counted from here: the local engine is shared by the module's tests); every expert got some.
        routed = routed_since(before["cluster"], cluster.stats().tokens_per_expert)
        assert routed == routed_since(before["local"], local.stats().tokens_per_expert)
        assert len(routed) == ckpt.config["num_hidden_layers"]
        assert all(len(layer) == num_experts and min(layer) > 0 for layer in routed), routed
    finally:
        cluster.shutdown()


def test_workers_read_only_their_experts_shards(hf_small: HFCheckpoint) -> None:
    import json

    index = json.loads((hf_small.path / "model.safetensors.index.json").read_text())["weight_map"]
    cluster = ClusterEngine.start(EngineConfig(model=str(hf_small.path), progress=False, num_kv_blocks=32),
                                  cluster_config(experts_per_worker=4))
    try:
        for worker in cluster.info["workers"]:
            own = {f for name, f in index.items()
                   if ".experts." in name and int(name.split(".")[5]) in worker["experts"]}
            assert set(worker["files_opened"]) == own
    finally:
        cluster.shutdown()


def test_two_clusters_on_one_machine_do_not_collide(hf_small: HFCheckpoint) -> None:
    cfg = EngineConfig(model=str(hf_small.path), progress=False, num_kv_blocks=64)
    engines: list[ClusterEngine] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            engines.append(ClusterEngine.start(cfg, cluster_config(experts_per_worker=4)))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors and len(engines) == 2
        assert len({e.info["rendezvous"] for e in engines}) == 2  # each picked its own free port
        a, b = (e.generate([[5, 6, 7, 8]], GREEDY)[0].completions[0].token_ids for e in engines)
        assert a == b
    finally:
        for e in engines:
            e.shutdown()


def _kill(cluster: ClusterEngine, worker_index: int) -> dict[str, Any]:
    info = cluster.info["workers"][worker_index]
    os.kill(info["pid"], signal.SIGKILL)
    return info


def test_worker_killed_while_idle_is_reported_by_name(hf_small: HFCheckpoint) -> None:
    """With recovery off, a dead worker fails the engine with an error naming it."""
    cluster = ClusterEngine.start(EngineConfig(model=str(hf_small.path), progress=False, num_kv_blocks=64),
                                  cluster_config(experts_per_worker=2, recover_workers=False))
    try:
        assert cluster.generate([[5, 6, 7]], GREEDY)[0].completions[0].token_ids
        killed = _kill(cluster, 2)
        started = time.monotonic()
        while cluster.health()["alive"] and time.monotonic() - started < 30:
            time.sleep(0.2)
        health = cluster.health()
        assert not health["alive"], "the death was not noticed within 30 s"
        assert f"expert worker 2 (rank 3, experts [4, 5], pid {killed['pid']}" in health["reason"]
        assert "died" in health["reason"]
        with pytest.raises(EngineDeadError, match="expert worker 2"):
            cluster.generate([[5, 6, 7]], GREEDY)
    finally:
        cluster.shutdown()
    _assert_released(cluster)


def test_worker_killed_mid_generation_fails_requests_naming_it(hf_small: HFCheckpoint) -> None:
    cluster = ClusterEngine.start(EngineConfig(model=str(hf_small.path), progress=False, num_kv_blocks=256,
                                               max_model_len=512),
                                  cluster_config(experts_per_worker=2, recover_workers=False))
    try:
        result: dict[str, Any] = {}

        def run() -> None:
            started = time.monotonic()
            try:
                cluster.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
                result["error"] = None
            except Exception as err:
                result["error"] = err
            result["seconds"] = time.monotonic() - started

        thread = threading.Thread(target=run)
        thread.start()
        while cluster.stats().num_running == 0:
            time.sleep(0.05)
        time.sleep(0.3)
        killed_at = time.monotonic()
        killed = _kill(cluster, 1)
        thread.join(timeout=60)
        assert not thread.is_alive()
        err = result["error"]
        assert isinstance(err, RequestFailedError)
        assert f"expert worker 1 (rank 2, experts [2, 3], pid {killed['pid']}" in str(err)
        assert time.monotonic() - killed_at < 30
    finally:
        cluster.shutdown()
    _assert_released(cluster)


def test_missing_resources_fail_fast_with_what_is_missing(hf_small: HFCheckpoint) -> None:
    started = time.monotonic()
    with pytest.raises(ClusterStartError) as err:
        ClusterEngine.start(EngineConfig(model=str(hf_small.path), progress=False),
                            cluster_config(use_gpus=True, placement_timeout_s=3))
    assert time.monotonic() - started < 20
    text = str(err.value)
    assert "could not place the cluster's 9 actors within 3s" in text and "missing: GPU 9" in text
    assert not [pg for pg in ray.util.placement_group_table().values() if pg["state"] not in ("REMOVED",)]


def _assert_released(cluster: ClusterEngine) -> None:
    """Every resource of this cluster is back, its placement group is removed, its coordinator is gone."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        free, total = (sum(r.get(k, 0) for k in ("CPU", "GPU")) for r in (ray.available_resources(),
                                                                           ray.cluster_resources()))
        pg = cluster.placement_group
        pg_state = ray.util.placement_group_table(pg)["state"] if pg is not None else "REMOVED"
        if free == total and pg_state == "REMOVED":
            break
        time.sleep(0.3)
    assert free == total, f"{total - free} CPUs/GPUs still held after shutdown"
    assert pg_state == "REMOVED"
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(cluster.coordinator.health.remote(), timeout=10)


def test_shutdown_releases_every_actor_and_the_placement_group(hf_small: HFCheckpoint) -> None:
    cluster = ClusterEngine.start(EngineConfig(model=str(hf_small.path), progress=False, num_kv_blocks=32),
                                  cluster_config(experts_per_worker=1))
    assert cluster.generate([[9, 10]], GREEDY)[0].completions[0].token_ids
    cluster.shutdown()
    _assert_released(cluster)


def test_bad_request_through_the_cluster_is_a_value_error(hf_small: HFCheckpoint) -> None:
    cluster = ClusterEngine.start(EngineConfig(model=str(hf_small.path), progress=False, num_kv_blocks=32,
                                               max_model_len=64), cluster_config(experts_per_worker=8))
    try:
        with pytest.raises(ValueError, match="prompt token id 999 at position 0 is outside the vocabulary"):
            cluster.generate([[999]], GREEDY)
        assert cluster.health()["alive"]
        assert cluster.generate([[1, 2]], GREEDY)[0].completions[0].token_ids
    finally:
        cluster.shutdown()


def test_engine_api_is_shared() -> None:
    """LocalEngine and ClusterEngine offer the same public methods."""
    public = {"generate", "stream", "stream_batches", "abort", "score", "stats", "health", "shutdown"}
    assert public <= set(dir(ClusterEngine)) and public <= set(dir(LocalEngine))
