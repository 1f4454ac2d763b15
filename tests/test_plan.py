"""``moe-cluster plan``: Mixtral-8x7B's published config (tests/data/mixtral-8x7b/config.json) on one 8-GPU node
and on two 40 GiB GPUs, a CPU node, and the plan as a serve.yaml overlay that the serving settings accept.
Weight sizes are checked against transformers' Mixtral built on the meta device (no memory, no weights)."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from cluster.engine.api import RECENT_STEPS
from cluster.engine.calibrate import calibrate, least_disturbed_ms, step_times_ms
from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import ClusterConfig, EngineConfig, PoolConfig
from cluster.model.config import ModelConfig
from cluster.model.quant import expert_quantization, quantize_weight
from cluster.planning.plan import (
    CPU_MICRO_BATCH_MIN_TOKENS,
    CPU_STREAM_CHUNKS_PER_CORE,
    CPU_WORKER_CORES,
    DECODE_BATCHES,
    EXCESS_DRAWS,
    GIB,
    LINK_MS_PER_WORKER,
    PREFILL_TOKENS,
    QUANTIZED_BYTES,
    Hardware,
    ModelSizes,
    Plan,
    interpolate,
    plan_cpus,
    plan_gpus,
    predict,
    split_experts,
    step_ms,
    worker_layer_ms,
    workers_ms,
)
from router_service.cli import main
from router_service.settings import AppSettings
from tests.conftest import process_environ
from workers.link_calibration import cores_busy, exchange_ms, expert_phase_ms

MIXTRAL = Path(__file__).parent / "data" / "mixtral-8x7b"


def run_plan(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = main(["plan", str(MIXTRAL), "--json", "--calibrate", "no", *argv])
    return code, json.loads(capsys.readouterr().out)


def test_sizes_match_transformers_mixtral_parameter_for_parameter() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    raw = json.loads((MIXTRAL / "config.json").read_text())
    with torch.device("meta"):
        model = MixtralForCausalLM(MixtralConfig(**raw))
    params = {name: p.numel() for name, p in model.named_parameters()}
    experts = sum(n for name, n in params.items() if ".experts." in name)
    sizes = ModelSizes.of(ModelConfig.from_file(MIXTRAL))
    assert sizes.params == sum(params.values())  # 46.7B
    assert sizes.coordinator_bytes == 2 * (sum(params.values()) - experts)  # bf16
    assert sizes.expert_bytes * 8 == 2 * experts
    assert sizes.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # K and V, layers, KV heads, head dim, bf16


def test_mixtral_fits_one_8_gpu_node_with_the_coordinator_beside_a_worker(capsys: pytest.CaptureFixture[str]) -> None:
    code, plan = run_plan(capsys, "--gpus", "8", "--gpu-memory-gib", "80")
    assert code == 0 and plan["fits"] is True and plan["gpus_used"] == 8
    devices = plan["devices"]
    assert sorted(e for d in devices for e in d["experts"]) == list(range(8))
    shared = [d for d in devices if len(d["roles"]) == 2]
    assert len(shared) == 1 and "coordinator 0" in shared[0]["roles"]
    assert all(d["used_bytes"] <= d["capacity_bytes"] for d in devices)
    kv = shared[0]["memory"]["kv_cache"]
    assert plan["kv_cache_tokens"] == kv // plan["kv_bytes_per_token"] >= 32768
    assert kv == shared[0]["capacity_bytes"] - sum(v for k, v in shared[0]["memory"].items() if k != "kv_cache")
    assert any("KV cache" in note and "GiB left" in note for note in plan["notes"])
    pool = plan["overlay"]["applications"]["moe-cluster"]["args"]["pool_options"]
    cluster = plan["overlay"]["applications"]["moe-cluster"]["args"]["cluster_options"]
    assert pool["worker_num_gpus"] + cluster["coordinator_num_gpus"] <= 1 < 2 * pool["worker_num_gpus"]
    assert cluster["link"] == "shm"


def test_mixtral_on_two_40_gib_gpus_says_what_does_not_fit_and_what_would(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, plan = run_plan(capsys, "--gpus", "2", "--gpu-memory-gib", "40")
    assert code == 1 and plan["fits"] is False
    assert any("93.4 GB" in note for note in plan["notes"])  # bf16 weights vs 2 x 40 GiB
    kinds = {alt["kind"]: alt for alt in plan["alternatives"]}
    assert kinds["experts int8"]["fits"] and kinds["experts int4"]["fits"]
    assert kinds["experts int4"]["kv_cache_tokens"] > kinds["experts int8"]["kv_cache_tokens"] > 32768
    cache = kinds["expert cache"]
    assert 0 < cache["resident_expert_layers"] < cache["of"] == 256 and cache["host_gib"] > 0
    # what it names is what serve takes: K of each worker's 4 experts per layer (2 workers, 32 layers)
    assert 0 < cache["expert_cache_size"] < 4 and cache["resident_expert_layers"] == cache["expert_cache_size"] * 64
    assert f"--expert-cache-size {cache['expert_cache_size']}" in cache["summary"]
    assert "--quantize-experts int8" in kinds["experts int8"]["summary"]
    # the sizes are those of moe-cluster's own quantized weights (cluster/model/quant.py), one expert matrix of each
    for quant, method in (("int8", expert_quantization("int8")), ("int4", expert_quantization("int4"))):
        assert method is not None
        w = torch.empty(14336, 4096)  # Mixtral-8x7B's w1: (intermediate, hidden)
        held = quantize_weight(w, method).nbytes
        assert held / w.numel() == pytest.approx(QUANTIZED_BYTES[quant], rel=1e-3), quant
    assert kinds["3 GPUs"]["fits"]  # and the plan it names does fit:
    code, three = run_plan(capsys, "--gpus", "3", "--gpu-memory-gib", "40")
    assert code == 0 and three["experts_per_worker"] == [3, 3, 2]


def test_text_output_and_argument_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(MIXTRAL), "--gpus", "8", "--gpu-memory-gib", "80", "--calibrate", "no"]) == 0
    text = capsys.readouterr().out
    assert "FITS" in text and "kv_cache" in text and "predicted step times" in text
    assert main(["plan", str(MIXTRAL), "--gpus", "8"]) == 1
    assert "--gpu-memory-gib" in capsys.readouterr().err
    assert main(["plan", str(MIXTRAL), "--gpus", "8", "--gpu-memory-gib", "80", "--nodes", "3"]) == 1
    assert "not a multiple of --nodes 3" in capsys.readouterr().err


def test_cpu_plan_gives_each_side_of_the_serial_schedule_every_core() -> None:
    """The coordinator and the workers take turns: a worker per CPU_WORKER_CORES core (at least one, at most one per
    expert), the workers' threads together no more than the cores, the coordinator as many threads as a worker;
    where threads share cores with the other side's they wait passively and micro-batches are off; 1-thread
    processes on several cores split steps from CPU_MICRO_BATCH_MIN_TOKENS tokens. The overlay caps streamed chunks
    in proportion to the cores, and the app's settings take it."""
    cfg = ModelConfig.from_file(MIXTRAL).__class__(**{**ModelConfig.from_file(MIXTRAL).__dict__,
                                                      "hidden_size": 64, "intermediate_size": 128,
                                                      "num_heads": 4, "num_kv_heads": 2, "head_dim": 16})
    assert [len(w) for w in plan_cpus(cfg, Hardware("cpu", 2, 24)).workers] == [4, 4]  # this machine's shape
    assert ClusterConfig().micro_batch_min_tokens == CPU_MICRO_BATCH_MIN_TOKENS  # the engine's own crossover
    for cores in (1, 2, 3, 5, 16, 64):
        plan = plan_cpus(cfg, Hardware("cpu", cores, 24))
        workers = min(8, max(1, cores // CPU_WORKER_CORES))
        assert plan.workers == split_experts(8, workers) and plan.coordinators == 1 and plan.fits
        assert sorted(e for w in plan.workers for e in w) == list(range(8))
        threads = plan.pool_options["threads_per_worker"]
        assert threads * len(plan.workers) <= cores < (threads + 1) * len(plan.workers)
        assert plan.pool_options["worker_num_cpus"] == threads == plan.cluster_options["coordinator_threads"]
        passive = "passive" if threads > 1 else None
        assert plan.pool_options["worker_omp_wait_policy"] == plan.cluster_options["coordinator_omp_wait_policy"] \
            == passive
        assert plan.overlaps == (cores > 1)  # both sides can compute at once (step_ms: as the cores hold them)
        if threads == 1 and cores > 1:  # ping-pong where each side has a core of its own
            assert plan.cluster_options["micro_batches"] == plan.micro_batches == 0
            assert plan.cluster_options["micro_batch_min_tokens"] == CPU_MICRO_BATCH_MIN_TOKENS
        else:
            assert plan.cluster_options["micro_batches"] == plan.micro_batches == 1
        ClusterConfig.from_dict(plan.cluster_options)  # what serve and the KubeRay render take
        PoolConfig.from_dict(plan.pool_options)
        # streamed chunks cost the Serve tier CPU the engine needs: their cap grows with the cores
        assert plan.app_options == {"stream_chunks_per_s": CPU_STREAM_CHUNKS_PER_CORE * cores}
        args = plan.overlay()["applications"]["moe-cluster"]["args"]
        settings = AppSettings.from_args({"model": str(MIXTRAL), **args})
        assert settings.stream_chunks_per_s == CPU_STREAM_CHUNKS_PER_CORE * cores


def test_plan_overlay_is_a_serve_config_the_settings_accept(tmp_path: Path) -> None:
    out = tmp_path / "serve.yaml"
    assert main(["plan", str(MIXTRAL), "--gpus", "8", "--gpu-memory-gib", "80", "--calibrate", "no",
                 "--write-config", str(out), "--write-overlay", str(tmp_path / "overlay.yaml")]) == 0
    config = yaml.safe_load(out.read_text())
    args = config["applications"][0]["args"]
    settings = AppSettings.from_args(args)
    assert settings.pool_config().worker_num_gpus == 0.75 and settings.cluster_config().coordinator_num_gpus == 0.25
    assert config["grpc_options"]  # the rest of the bundled config is kept
    overlay = yaml.safe_load((tmp_path / "overlay.yaml").read_text())
    assert overlay["applications"]["moe-cluster"]["args"]["pool_options"].items() <= args["pool_options"].items()


def test_fractional_gpu_fields_are_checked() -> None:
    assert PoolConfig(worker_num_gpus=0.25).worker_num_gpus == 0.25
    assert ClusterConfig(coordinator_num_gpus=2).coordinator_num_gpus == 2
    with pytest.raises(ValueError, match="worker_num_gpus must be in"):
        PoolConfig(worker_num_gpus=1.5)
    with pytest.raises(ValueError, match="coordinator_num_gpus must be a positive number"):
        ClusterConfig(coordinator_num_gpus=0)


def test_split_and_interpolate() -> None:
    assert split_experts(8, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert split_experts(8, 8) == [[e] for e in range(8)]
    points = {"1": 1.0, "4": 2.0, "16": 8.0}
    assert interpolate(points, 0.5) == 1.0 and interpolate(points, 10) == pytest.approx(5.0)
    assert interpolate(points, 28) == pytest.approx(14.0)  # extends the last segment
    assert ModelSizes.of(ModelConfig.from_file(MIXTRAL)).total_bytes / GIB == pytest.approx(86.99, abs=0.01)


def test_step_model_shares_a_cpu_nodes_cores_among_its_processes() -> None:
    """Eight one-expert workers of one thread on a 2-core node take turns for the cores: a layer's expert work is
    their sum over the cores, not the slowest worker's; on 16 cores it is the slowest one's; workers of 2 threads
    (costs measured on 2) take one core pair at a time. The measured exchange replaces the assumed link cost."""
    cfg = ModelConfig.from_file(MIXTRAL)
    flat = {"1": 1.0, "1024": 1.0}
    costs: dict[str, Any] = {"coordinator_layer": flat, "expert": {"1": 2.0, "1024": 2.0},
                             "lm_head": {"1": 0.0, "1024": 0.0}}
    tokens = 512  # every expert has rows
    for cores, threads, worker_ms in ((2, 1, 8 * 2.0 / 2), (16, 1, 2.0), (2, 2, 8 * 2.0), (16, 2, 2.0),
                                      (8, 2, 8 * 2.0 / 4)):
        base = plan_cpus(cfg, Hardware("cpu", cores, 512))
        plan = dataclasses.replace(base, workers=split_experts(8, 8),
                                   threads={"coordinator": threads, "worker": threads})
        expected = cfg.num_layers * (1.0 + worker_ms + 8 * LINK_MS_PER_WORKER)
        assert step_ms(plan, costs, tokens, 1, prefill=False) == pytest.approx(expected)
        measured = costs | {"exchange_ms": {"1": 0.5, "8": 3.0}}
        assert step_ms(plan, measured, tokens, 1, prefill=False) == pytest.approx(expected + cfg.num_layers * (
            3.0 - 8 * LINK_MS_PER_WORKER))


def test_expert_calls_are_expected_over_every_routing_not_at_the_mean_rows() -> None:
    """A worker's expected expert time, against an exact enumeration of every routing of 3 tokens (each picks 2 of
    4 experts, all choices alike): an expert with no rows costs nothing, and a cost that steps with the rows is
    averaged over the row counts, not read at their mean."""
    costs = {"expert": {"1": 1.0, "2": 1.0, "3": 5.0, "4": 5.0}}  # a kernel step between 2 and 3 rows
    pairs = list(itertools.combinations(range(4), 2))
    total = Fraction(0)
    for routing in itertools.product(pairs, repeat=3):
        rows = [sum(e in pair for pair in routing) for e in range(2)]  # a worker holding experts 0 and 1
        total += sum(Fraction(int(interpolate(costs["expert"], n))) for n in rows if n)
    exact = float(total / len(pairs) ** 3)
    assert worker_layer_ms(costs, 2, 4, 2, 3) == pytest.approx(exact, rel=1e-9)
    mean_rows = 3 * 2 / 4
    assert abs(exact - 2 * interpolate(costs["expert"], mean_rows)) > 0.5  # f(mean) would be wrong here
    assert worker_layer_ms(costs, 2, 4, 2, 0) == 0.0


def test_the_wait_is_the_slowest_workers_expected_time_over_routings() -> None:
    """One token on 2 workers of 4 experts: the coordinator waits for the slower worker, and on average that is
    longer than the slower worker's average. Against an exact enumeration of every routing of the same model (each
    expert called with chance top_k / E, independently), within the draws' sampling error; the slowest average
    worker alone is far off."""
    cfg = ModelConfig.from_file(MIXTRAL)
    costs = {"expert": {"1": 1.0, "2": 1.5}}
    plan = dataclasses.replace(plan_cpus(cfg, Hardware("cpu", 16, 512)), workers=split_experts(8, 2),
                               threads={"coordinator": 1, "worker": 1})  # 16 cores: no turns, the slower one
    p = Fraction(2, 8)
    exact, square = Fraction(0), Fraction(0)
    for called in itertools.product((0, 1), repeat=8):
        chance = Fraction(1)
        for c in called:
            chance *= p if c else 1 - p
        slower = max(sum(called[:4]), sum(called[4:]))  # each call of one row costs 1.0
        exact += chance * slower
        square += chance * slower ** 2
    wait, per_worker = workers_ms(plan, costs, 1)
    assert per_worker == pytest.approx([4 * 0.25, 4 * 0.25])
    sampling_error = 4 * float(square - exact ** 2) ** 0.5 / EXCESS_DRAWS ** 0.5  # 4 standard errors
    assert wait == pytest.approx(float(exact), abs=sampling_error)
    assert float(exact) - max(per_worker) > 2 * sampling_error


def test_two_micro_batches_fill_the_pipeline_once_a_step() -> None:
    """Ping-pong with experts slower than attention: the workers run one micro-batch after the other across
    layers, so a layer costs their two turns and the links, and the step the coordinator's first turn once."""
    cfg = ModelConfig.from_file(MIXTRAL)
    costs: dict[str, Any] = {"coordinator_layer": {"1": 1.0, "1024": 1.0}, "expert": {"1": 1.0, "1024": 1.0},
                             "lm_head": {"1": 0.0, "1024": 0.0}, "exchange_ms": {"1": 0.25, "8": 0.25}}
    plan = dataclasses.replace(plan_cpus(cfg, Hardware("cpu", 16, 512)), workers=split_experts(8, 1),
                               overlaps=True)  # each side on cores of its own
    tokens = 1024  # every expert has rows in both halves: a worker's turn is 8 calls of 1 ms
    expected = cfg.num_layers * (2 * 8.0 + 2 * 0.25) + 1.0
    assert step_ms(plan, costs, tokens, 2, prefill=False) == pytest.approx(expected)
    assert step_ms(plan, costs, tokens, 1, prefill=False) == pytest.approx(cfg.num_layers * (1.0 + 8.0 + 0.25))
    # a step splits between sequences: one sequence's decode step is serial whatever the micro-batches asked
    assert step_ms(plan, costs, 1, 2, prefill=False) == step_ms(plan, costs, 1, 1, prefill=False)
    assert step_ms(plan, costs, 2, 2, prefill=False) != step_ms(plan, costs, 2, 1, prefill=False)


def test_processes_of_several_threads_overlap_only_their_one_thread_stretches() -> None:
    """Two micro-batches on a 2-core node, every process on 2 threads: where the calls kept one core busy (CPU time
    = time) the halves overlap as 1-thread processes do; where they kept both (twice), they take turns; halfway,
    half of each side runs alone and the rest overlaps. One thread: CPU times change nothing."""
    cfg = ModelConfig.from_file(MIXTRAL)
    wall: dict[str, Any] = {"coordinator_layer": {"1": 1.0, "1024": 1.0}, "expert": {"1": 2.0, "1024": 2.0},
                            "lm_head": {"1": 0.0, "1024": 0.0}}
    link, layers, tokens = LINK_MS_PER_WORKER, cfg.num_layers, 1024  # every expert has rows in both halves

    def with_cores(busy: float) -> dict[str, Any]:
        return wall | {f"{k}_cores": {"1": busy, "1024": busy} for k in ("coordinator_layer", "expert")}

    def plan(threads: int) -> Plan:
        return dataclasses.replace(plan_cpus(cfg, Hardware("cpu", 2, 512)), workers=split_experts(8, 1),
                                   threads={"coordinator": threads, "worker": threads})

    coord, worker = 1.0, 8 * 2.0  # a layer's turns: the coordinator's, the worker's 8 calls
    overlapped = layers * 2 * (worker + link) + coord  # the busier side's two turns; the fill once
    assert step_ms(plan(2), with_cores(1.0), tokens, 2, prefill=False) == pytest.approx(overlapped)
    assert step_ms(plan(1), with_cores(2.0), tokens, 2, prefill=False) == pytest.approx(overlapped)
    assert step_ms(plan(2), with_cores(2.0), tokens, 2, prefill=False) == pytest.approx(
        layers * 2 * (coord + worker + link))  # taking turns: no fill
    half = layers * 2 * (coord / 2 + worker / 2 + max(coord, worker) / 2 + link) + min(coord, worker) / 2
    assert step_ms(plan(2), with_cores(1.5), tokens, 2, prefill=False) == pytest.approx(half)
    for busy in (1.0, 1.5, 2.0):  # serial: nothing to overlap
        assert step_ms(plan(2), with_cores(busy), tokens, 1, prefill=False) == pytest.approx(
            layers * (coord + worker + link))


def test_predictions_choose_the_schedule_and_say_so() -> None:
    """Calibrated costs choose the micro-batches: two from the smallest predicted batch where they beat serial,
    else serial with no threshold left in the overlay; a note says which, beside plan_cpus' default."""
    cfg = ModelConfig.from_file(MIXTRAL)
    linear = {"1": 0.01, "1024": 10.24}  # 0.01 ms a row
    costs: dict[str, Any] = {"coordinator_layer": linear, "expert": linear, "lm_head": {"1": 0.0, "1024": 0.0},
                             "exchange_ms": {"1": 0.25, "8": 0.25}}
    plan = dataclasses.replace(plan_cpus(cfg, Hardware("cpu", 16, 512)), workers=split_experts(8, 1), overlaps=True,
                               notes=[], cluster_options={"micro_batches": 0, "micro_batch_min_tokens": 512})
    predict(plan, costs, "test")
    by = {(p.phase, p.batch, p.micro_batches): p.step_ms for p in plan.predictions}
    wins = [b for b in DECODE_BATCHES if ("decode", b, 2) in by and by["decode", b, 2] < by["decode", b, 1]]
    assert by["prefill", PREFILL_TOKENS, 2] < by["prefill", PREFILL_TOKENS, 1]  # half the rows, overlapped
    first = min(wins, default=PREFILL_TOKENS)
    assert plan.micro_batches == 0 and plan.cluster_options["micro_batch_min_tokens"] == first
    assert plan.notes[-1].endswith(f"2 micro-batches from {first} tokens a step, where they are predicted faster")
    dear_links = costs | {"exchange_ms": {"1": 50.0, "8": 50.0}}
    predict(plan, dear_links, "test")
    assert plan.micro_batches == 1 and plan.cluster_options["micro_batches"] == 1
    assert "micro_batch_min_tokens" not in plan.cluster_options
    assert plan.notes[-1].endswith("serial at every batch and prefill predicted (micro-batches 1)")


def test_timed_expert_phases_replace_the_echo_exchange_by_what_the_calls_did_not_explain() -> None:
    """With whole expert phases timed for W workers, a layer's link cost is the phase less the modelled expert
    calls of that W at those tokens (uniform routing, as timed): between timed token counts it is
    interpolated, past them flat, and between timed worker counts interpolated again; a phase faster than the
    model costs nothing, never less."""
    cfg = ModelConfig.from_file(MIXTRAL)
    costs: dict[str, Any] = {"coordinator_layer": {"1": 1.0, "1024": 1.0}, "expert": {"1": 2.0, "1024": 2.0},
                             "lm_head": {"1": 0.0, "1024": 0.0}, "exchange_ms": {"1": 0.5, "8": 0.5}}
    base = plan_cpus(cfg, Hardware("cpu", 2, 512))
    one, four = (dataclasses.replace(base, workers=split_experts(8, w)) for w in (1, 4))
    model_8 = {w: workers_ms(p, costs, 8)[0] for w, p in ((1, one), (4, four))}
    model_32 = {w: workers_ms(p, costs, 32)[0] for w, p in ((1, one), (4, four))}
    assert model_8[1] == pytest.approx(8 * (1 - 0.75 ** 8) * 2.0)  # an expert is called when one of 8 tokens picks it
    costs["expert_phase_ms"] = {"1": {"8": model_8[1] + 1.0, "32": model_32[1] + 3.0},
                                "4": {"8": model_8[4] + 2.0, "32": model_32[4] - 5.0}}

    def link(plan: Any, tokens: int) -> float:
        serial = step_ms(plan, costs, tokens, 1, prefill=False)
        return (serial - step_ms(plan, costs, tokens, 1, prefill=False, link_ms=0.0)) / cfg.num_layers

    assert link(one, 8) == pytest.approx(1.0) and link(one, 32) == pytest.approx(3.0)
    assert link(one, 20) == pytest.approx(2.0) and link(one, 64) == pytest.approx(3.0)
    assert link(four, 8) == pytest.approx(2.0) and link(four, 32) == pytest.approx(0.0)
    two = dataclasses.replace(base, workers=split_experts(8, 2))
    assert link(two, 8) == pytest.approx(1.0 + (2.0 - 1.0) / 3)


def test_a_coordinator_turn_after_a_wait_costs_what_the_calibration_timed() -> None:
    """Where the calibration timed the coordinator's turn right after an expert phase (coordinator_resume_ms), each
    layer of a cluster step costs that much more; interpolated over tokens (flat past the last timed) and over
    worker counts; none where it was not timed, and none for an engine that passes resume_ms=0 (the local one)."""
    cfg = ModelConfig.from_file(MIXTRAL)
    costs: dict[str, Any] = {"coordinator_layer": {"1": 1.0, "1024": 1.0}, "expert": {"1": 2.0, "1024": 2.0},
                             "lm_head": {"1": 0.0, "1024": 0.0}, "exchange_ms": {"1": 0.5, "8": 0.5}}
    base = plan_cpus(cfg, Hardware("cpu", 2, 512))
    one, two, eight = (dataclasses.replace(base, workers=split_experts(8, w)) for w in (1, 2, 8))
    timed = costs | {"coordinator_resume_ms": {"1": {"1": 0.5, "8": 1.0, "32": 0.0}, "8": {"1": 0.25, "8": 2.0}}}

    def resume(plan: Any, tokens: int) -> float:
        return (step_ms(plan, timed, tokens, 1, prefill=False)
                - step_ms(plan, costs, tokens, 1, prefill=False)) / cfg.num_layers

    assert resume(one, 1) == pytest.approx(0.5) and resume(one, 8) == pytest.approx(1.0)
    assert resume(one, 20) == pytest.approx(0.5) and resume(one, 64) == pytest.approx(0.0)
    assert resume(eight, 8) == pytest.approx(2.0) and resume(eight, 64) == pytest.approx(2.0)
    assert resume(two, 8) == pytest.approx(1.0 + (2.0 - 1.0) / 7)
    for plan in (one, eight):
        assert step_ms(plan, timed, 8, 1, prefill=False, resume_ms=0.0) == step_ms(plan, costs, 8, 1, prefill=False)


def test_link_calibration_workers_run_as_the_plan_deploys_them() -> None:
    """The exchange is timed with worker processes of the calibration's thread count, idle threads passive where
    they are several (as the plan deploys them): the policy is in the spawned worker's environment, this
    process's environment is left as it was, and the worker answers over its link."""
    from cluster.links.protocol import OP_WORK, LinkSpec
    from workers.link_calibration import _start_loops, _stop_loops

    before = dict(os.environ)
    spec = LinkSpec(hidden=8, dtype="float32", max_local=1)
    for threads, policy in ((1, None), (2, "PASSIVE")):
        procs, ends = _start_loops(spec, 1, threads=threads)
        try:
            assert process_environ(procs[0].pid).get("OMP_WAIT_POLICY") == (policy or before.get("OMP_WAIT_POLICY"))
            rows = torch.arange(16, dtype=torch.float32).reshape(2, 8)
            out = torch.empty_like(rows)
            ends[0].send(OP_WORK, layer=0, tag=0, counts=[2], rows=rows, out=out)
            ends[0].recv_result(0)
            assert torch.equal(out, rows)  # the echo experts hand the rows back
        finally:
            _stop_loops(procs, ends)
        assert dict(os.environ) == before


def test_calibration_times_the_engine_and_the_links_on_this_machine(demo_dir: Path, tmp_path: Path) -> None:
    """A real calibration at the demo's shapes: op costs, the local engine's own decode and prefill steps (models of
    1 and 3 layers) and the links' exchange with 1 and 2 worker processes; every time positive, cached and read
    back."""
    cfg = ModelConfig.from_file(demo_dir)
    also = functools.partial(exchange_ms, cfg.hidden_size, cfg.dtype, (1, 2), rounds=20)
    costs = calibrate(cfg, cfg.dtype, "cpu", context=24, cache=tmp_path, repeats=2, rows=(1, 8), also=also)
    for kind in ("coordinator_layer", "expert", "moe_overhead", "lm_head", "engine_layer", "engine_step"):
        assert set(costs[kind]) == {"1", "8"}, kind
        assert all(v > 0 for v in costs[kind].values()), (kind, costs[kind])
    for kind in ("engine_prefill_layer", "engine_prefill_step"):
        assert set(costs[kind]) == {"128", "256", "1024"}, kind
        assert all(v > 0 for v in costs[kind].values()), (kind, costs[kind])
    assert costs["engine_prefill_layer"]["1024"] > costs["engine_layer"]["8"]  # 1024 rows cost more than 8
    assert set(costs["exchange_ms"]) == {"1", "2"} and all(v > 0 for v in costs["exchange_ms"].values())
    timed = expert_phase_ms(cfg, cfg.dtype, (1, 3), tokens=(8, 32), seconds=0.1, context=24)
    phase, resume = timed["expert_phase_ms"], timed["coordinator_resume_ms"]
    assert set(phase) == {"1", "3"} and all(set(by) == {"8", "32"} and min(by.values()) > 0 for by in phase.values())
    assert set(resume) == {"1", "3"} and all(set(by) == {"8", "32"} and min(by.values()) >= 0
                                             for by in resume.values())
    again = calibrate(cfg, cfg.dtype, "cpu", context=24, cache=tmp_path, repeats=2, rows=(1, 8))
    assert again["cached"] and again["exchange_ms"] == costs["exchange_ms"]
    assert again["engine_layer"] == costs["engine_layer"]
    # the cores a call keeps busy, where it has several threads (one thread: one core, nothing to measure), in a
    # process of those threads
    assert cores_busy(cfg, cfg.dtype, 1) == {}
    busy = cores_busy(cfg, cfg.dtype, 2, rows=(1, 8, 256), context=24, repeats=2)
    for kind in ("coordinator_layer_cores", "expert_cores"):
        assert set(busy[kind]) == {"1", "8", "256"}, busy
        assert all(0 < cores <= 2 for cores in busy[kind].values()), busy


def test_step_times_are_each_steps_own(demo_dir: Path) -> None:
    """The engine keeps its last steps' (tokens, seconds); step_times_ms takes a run's steps of the tokens asked
    for, and says so when the run made none; least_disturbed_ms is their 20th percentile."""
    engine = EngineLoop.local(EngineConfig(model=str(demo_dir), progress=False, enable_prefix_caching=False))
    try:
        prompts = [[5 + i] * 12 for i in range(3)]
        before = engine.stats().num_steps
        ms = step_times_ms(engine, functools.partial(
            engine.generate, prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)), 3)
        stats = engine.stats()
        made = stats.recent_steps[before - stats.num_steps:]
        assert [tokens for tokens, _ in made] == [36, 3, 3, 3, 3]  # the prefill, then 4 decode steps of 3 sequences
        assert all(seconds > 0 for _, seconds in made)
        assert ms == pytest.approx([1000 * seconds for _, seconds in made[1:]])
        with pytest.raises(RuntimeError, match="no step computed 7 tokens"):
            step_times_ms(engine, functools.partial(engine.generate, prompts, SamplingParams(max_tokens=2)), 7)
        engine.generate([[5] * 4], SamplingParams(max_tokens=RECENT_STEPS + 5, ignore_eos=True))
        assert len(engine.stats().recent_steps) == RECENT_STEPS  # bounded: the oldest go
        assert engine.stats().recent_steps[-1][0] == 1
    finally:
        engine.shutdown()


def test_least_disturbed_is_the_lowest_fifths_boundary() -> None:
    """Half the samples from a fast state (10 ms, a lucky 7 among them), half from a slow one (14 ms): the estimate
    is the fast state's time, neither the median (between the states) nor the lucky minimum."""
    samples = [7.0] + [10.0] * 9 + [14.0] * 10
    assert least_disturbed_ms(samples) == 10.0
    assert least_disturbed_ms([3.0]) == 3.0 and least_disturbed_ms([4.0, 2.0]) == pytest.approx(2.4)


def test_plans_fit_or_say_why_across_gpu_counts() -> None:
    cfg = ModelConfig.from_file(MIXTRAL)
    for gpus in range(1, 17):
        plan = plan_gpus(cfg, Hardware("gpu", gpus, 80))
        assert plan.fits == (gpus >= 2)  # 87 GiB of bf16 weights need two 80 GiB GPUs
        if plan.fits:
            assert all(d.used_bytes <= d.capacity_bytes for d in plan.devices)
            assert plan.coordinators == max(1, gpus - len(plan.workers))  # spare GPUs hold more coordinators
        else:
            assert any(note.startswith("does not fit") for note in plan.notes)


def test_serve_without_shape_flags_takes_the_plans_shape_for_this_machine(demo_dir: Path) -> None:
    from cluster.planning.hardware import local_hardware
    from router_service.cli import build_parser
    from router_service.engine_deployment import engine_deployment_options
    from router_service.serve_config import resolve_config

    def app(*flags: str) -> dict[str, Any]:
        args = build_parser().parse_args(["serve", "--model", str(demo_dir), *flags])
        return dict(resolve_config(args)["applications"][0]["args"])

    def pool(*flags: str) -> dict[str, Any]:
        return dict(app(*flags)["pool_options"])

    planned = app()
    if not torch.cuda.is_available():  # the CPU plan for this machine, both sides on the threads it gives them
        plan = plan_cpus(ModelConfig.from_file(demo_dir), local_hardware())
        assert planned["pool_options"]["experts_per_worker"] == len(plan.workers[0])
        for key in ("threads_per_worker", "worker_omp_wait_policy"):
            assert planned["pool_options"][key] == plan.pool_options[key]
        for key in ("coordinator_threads", "coordinator_omp_wait_policy", "micro_batches"):
            assert planned["cluster_options"][key] == plan.cluster_options[key]
        assert planned["stream_chunks_per_s"] == plan.app_options["stream_chunks_per_s"]
        # the Serve replica that is the coordinator starts with the wait policy in its environment
        actor = engine_deployment_options(AppSettings.from_args(planned))["ray_actor_options"]
        policy = plan.cluster_options["coordinator_omp_wait_policy"]
        assert actor.get("runtime_env", {}).get("env_vars", {}).get("OMP_WAIT_POLICY") == (
            policy.upper() if policy else None)
    assert pool("--no-auto-shape")["experts_per_worker"] == 1  # the bundled config's own
    assert "stream_chunks_per_s" not in app("--no-auto-shape")  # (AppSettings' default)
    assert pool("--experts-per-worker", "2")["experts_per_worker"] == 2
