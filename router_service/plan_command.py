"""``moe-cluster plan``: fit the cluster to the hardware, from a checkpoint's config.json alone.

The hardware: ``--gpus N --gpu-memory-gib G [--nodes K]``, or ``--cpus C --memory-gib M``, or ``--ray ADDRESS`` (the
CPUs, GPUs and nodes of a running Ray cluster), or, with none of these, this machine. Prints the plan
(cluster/planning/plan.py), or with ``--json`` one object; ``--write-overlay FILE`` writes it as a serve.yaml overlay
(the form of k8s/overlays/*/serve-overrides.yaml) and ``--write-config FILE`` as a whole Serve config (the bundled
serve.yaml with the plan merged in) that ``moe-cluster serve --config FILE`` deploys. Exit status 0 when the plan
fits, 1 when it does not.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # `moe-cluster --help` builds this parser: torch (under cluster.model.config) only when planning
    from cluster.planning.plan import Hardware, Plan

GIB = 2**30


def add_plan_parser(sub: Any) -> None:
    plan = sub.add_parser("plan", help="plan the cluster for a model and the hardware (no weights needed)",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("model", help="a checkpoint directory or its config.json (only config.json is read)")
    plan.add_argument("--gpus", type=int, metavar="N",
                      help="GPUs in all (default: this machine's GPUs, or its CPUs without CUDA)")
    plan.add_argument("--gpu-memory-gib", type=float, metavar="G",
                      help="memory of each GPU, GiB (default: this machine's; required with --gpus)")
    plan.add_argument("--nodes", type=int, default=1, metavar="K", help="nodes the GPUs are on (default: %(default)s)")
    plan.add_argument("--cpus", type=int, metavar="C",
                      help="plan for a CPU node with C cores (default: this machine's, without CUDA)")
    plan.add_argument("--memory-gib", type=float, metavar="M",
                      help="with --cpus: the node's memory, GiB (default: this machine's)")
    plan.add_argument("--ray", metavar="ADDRESS",
                      help="plan for the running Ray cluster at ADDRESS: its CPUs, GPUs, nodes; with GPUs, "
                           "--gpu-memory-gib too (default: none, the flags or this machine)")
    plan.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                      help="weight dtype (default: the checkpoint's)")
    plan.add_argument("--max-model-len", type=int,
                      help="longest sequence (default: the config's max_position_embeddings)")
    plan.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step (default: %(default)s)")
    plan.add_argument("--calibrate", choices=["auto", "yes", "no"], default="auto",
                      help="measure op costs on this machine (cached) when the target is this machine's kind "
                           "of device; otherwise estimate GPU costs from --gpu-bandwidth-gbs/--gpu-tflops "
                           "(default: %(default)s)")
    plan.add_argument("--recalibrate", action="store_true", help="measure op costs again (default: use the cache)")
    plan.add_argument("--gpu-bandwidth-gbs", type=float, default=2000.0,
                      help="GPU memory bandwidth for estimated costs, GB/s (default: %(default)s)")
    plan.add_argument("--gpu-tflops", type=float, default=300.0,
                      help="GPU dense TFLOPS at the dtype for estimated costs (default: %(default)s)")
    plan.add_argument("--json", action="store_true", help="print one JSON object (default: text)")
    plan.add_argument("--write-overlay", metavar="FILE",
                      help="write the plan as a serve.yaml overlay (default: none)")
    plan.add_argument("--write-config", metavar="FILE",
                      help="write the bundled serve.yaml with the plan merged in, for serve --config FILE "
                           "(default: none)")


def hardware_from_args(args: argparse.Namespace) -> Hardware:
    from cluster.planning.hardware import local_hardware, memory_gib
    from cluster.planning.plan import Hardware

    if args.gpus is not None and args.cpus is not None:
        raise ValueError("--gpus and --cpus describe different hardware: give one")
    if args.gpus is not None:
        if args.gpu_memory_gib is None:
            raise ValueError("--gpus N needs --gpu-memory-gib G (each GPU's memory)")
        return Hardware("gpu", args.gpus, args.gpu_memory_gib, args.nodes)
    if args.cpus is not None:
        return Hardware("cpu", args.cpus, args.memory_gib or memory_gib(), 1)
    if args.ray:
        return _ray_hardware(args.ray, args.gpu_memory_gib)
    return local_hardware(args.gpu_memory_gib, args.memory_gib)


def _ray_hardware(address: str, gpu_memory_gib: float | None) -> Hardware:
    import ray

    from cluster.planning.hardware import memory_gib
    from cluster.planning.plan import Hardware

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False)
    try:
        total = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    finally:
        if started:
            ray.shutdown()
    gpus = int(total.get("GPU", 0))
    if gpus:
        if gpu_memory_gib is None:
            raise ValueError(f"the Ray cluster at {address} has {gpus} GPUs: give --gpu-memory-gib G")
        return Hardware("gpu", gpus, gpu_memory_gib, nodes if gpus % nodes == 0 else 1, source="ray")
    return Hardware("cpu", int(total.get("CPU", 1)), total.get("memory", 0) / GIB or memory_gib(), 1, source="ray")


def make_plan(args: argparse.Namespace) -> Plan:
    from cluster.model.config import ModelConfig
    from cluster.planning.plan import plan_cpus, plan_gpus, predict, roofline_costs

    cfg = ModelConfig.from_file(args.model)
    hw = hardware_from_args(args)
    name = Path(args.model).resolve().name if Path(args.model).is_dir() else Path(args.model).resolve().parent.name
    build = plan_gpus if hw.kind == "gpu" else plan_cpus
    plan = build(cfg, hw, name=name, dtype=args.dtype, max_model_len=args.max_model_len,
                 max_num_seqs=args.max_num_seqs)
    here = "gpu" if _has_cuda() else "cpu"
    if args.calibrate == "yes" or (args.calibrate == "auto" and hw.kind == here):
        import torch

        from cluster.engine.calibrate import calibrate

        torch.set_num_threads(plan.threads["worker"])
        also = None
        if here == "cpu":  # links and expert phases with as many worker processes as the plan has (one node)
            from workers.link_calibration import link_costs

            counts = tuple(sorted({1, 2, len(plan.workers)}))
            also = functools.partial(link_costs, cfg, plan.sizes.dtype, counts)
        costs = calibrate(cfg, plan.sizes.dtype, "cuda" if here == "gpu" else "cpu", refresh=args.recalibrate,
                          also=also)
        where = f"cached {costs['cached']}" if "cached" in costs else "measured now"
        load = costs.get("load_average")
        if load and load[0] > (costs.get("cpu_count") or 1):
            where += f"; load average {load[0]:g} on {costs.get('cpu_count')} cores then: costs inflated, " \
                     "--recalibrate when the machine is quiet"
        predict(plan, costs, f"measured on this machine ({costs['device']}, {costs['dtype']}, "
                             f"{costs['threads']} thread(s); {where})")
    elif hw.kind == "gpu":
        costs = roofline_costs(cfg, plan.sizes.dtype, args.gpu_bandwidth_gbs, args.gpu_tflops)
        predict(plan, costs, f"estimated from {args.gpu_bandwidth_gbs:g} GB/s and {args.gpu_tflops:g} TFLOPS "
                             "(no GPU here to measure on)")
    return plan


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def render_text(plan: Plan) -> str:
    hw = plan.hardware
    lines = [f"plan for {plan.model} on {hw.describe()} ({hw.source}): "
             + ("FITS" if plan.fits else "DOES NOT FIT"),
             f"  weights ({plan.sizes.dtype}): {plan.sizes.total_bytes / GIB:.2f} GiB = coordinator "
             f"{plan.sizes.coordinator_bytes / GIB:.2f} + {plan.sizes.num_experts} experts x "
             f"{plan.sizes.expert_bytes / GIB:.2f}; KV {plan.sizes.kv_bytes_per_token / 1024:g} KiB per token",
             f"  {plan.coordinators} coordinator(s), {len(plan.workers)} expert worker(s): experts per worker "
             f"{[len(w) for w in plan.workers]}; threads {plan.threads}; micro-batches "
             f"{'auto' if plan.micro_batches == 0 else plan.micro_batches}"
             + (f" (2 from {plan.cluster_options.get('micro_batch_min_tokens')} tokens a step)"
                if plan.micro_batches == 0 else ""),
             f"  {'device':<8} {'roles':<28} {'experts':<14} memory GiB (used / capacity)"]
    for dev in plan.devices:
        if not dev.roles:
            continue
        kind = f"{dev.kind}{dev.index}" + (f"@n{dev.node}" if hw.nodes > 1 else "")
        roles = ", ".join(f"{r} ({dev.gpu_share[r]:g})" if r in dev.gpu_share else r for r in dev.roles)
        memory = ", ".join(f"{k} {v / GIB:.2f}" for k, v in dev.memory.items())
        experts = ",".join(map(str, dev.experts)) if len(dev.experts) <= 4 else f"{len(dev.experts)} experts"
        lines.append(f"  {kind:<8} {roles:<28} {experts:<14} {memory} "
                     f"({dev.used_bytes / GIB:.1f} / {dev.capacity_bytes / GIB:.1f})")
    lines += [f"  - {note}" for note in plan.notes]
    if plan.predictions:
        lines.append(f"  predicted step times ({plan.cost_source}):")
        for p in plan.predictions:
            what = f"decode {p.batch} seqs" if p.phase == "decode" else f"prefill {p.batch} tokens"
            lines.append(f"    {what:<20} {p.micro_batches} micro-batch(es): {p.step_ms:9.2f} ms/step, "
                         f"{p.tokens_per_s:10,.0f} tok/s")
    return "\n".join(lines)


def merged_config(plan: Plan) -> dict[str, Any]:
    """The bundled serve.yaml with the plan's overlay merged in (mappings key by key, the overlay's values win)."""
    from router_service.serve_config import DEFAULT_CONFIG, load_serve_config

    config = copy.deepcopy(load_serve_config(DEFAULT_CONFIG))
    app = config["applications"][0]
    overlay = plan.overlay(app.get("name", "moe-cluster"))["applications"][app.get("name", "moe-cluster")]
    app["args"] = _merge(app.get("args") or {}, overlay["args"])
    return config


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return override


def plan_command(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    if args.write_overlay:
        Path(args.write_overlay).write_text("# written by moe-cluster plan\n" + yaml.safe_dump(plan.overlay(),
                                                                                             sort_keys=False))
    if args.write_config:
        Path(args.write_config).write_text("# the bundled serve.yaml with moe-cluster plan's overlay merged in\n"
                                           + yaml.safe_dump(merged_config(plan), sort_keys=False))
    print(json.dumps(plan.to_json()) if args.json else render_text(plan))
    return 0 if plan.fits else 1
