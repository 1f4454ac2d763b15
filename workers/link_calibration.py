"""What one layer's exchange with the workers costs on this machine, beyond the expert calls: measured on the real
code, for ``moe-cluster plan``'s step model (cluster/planning/plan.py reads ``costs["exchange_ms"]``,
``costs["expert_phase_ms"]`` and ``costs["coordinator_resume_ms"]``).

W expert loops (workers/expert_loop.py), each in a process of its own as a pool's workers are, serve shared-memory
links (cluster/links/shm.py); one coordinator end per loop sends a layer's rows to all W and waits for all W
results, as a coordinator's layer does. The median round of many is the time for W workers.

* ``exchange_ms``: experts that hand their rows back unchanged: packing and unpacking, the sockets, waking W
  processes and their loops.
* ``expert_phase_ms``: the model's own expert shapes (weights of no meaning, streamed from memory as a real step
  reads them: layers cycled), E experts split over the W workers as the pool lays them out, a step's tokens at a
  few counts routed as a router of no preference routes them (each token its top-k of random logits, drawn anew
  every round: some experts get none, the slowest worker sets the pace), and between two rounds the
  coordinator's own turn of the layer on those tokens (its attention and MoE bookkeeping, as long as a real one:
  the workers sleep while it computes, as in a step). This is the whole expert phase of a layer as a coordinator
  waits for it, so it also holds what the echo cannot: the worker's grouped expert call around the matmuls,
  waking workers that slept, the wait for the slowest, and W processes that compute at once sharing the node's
  cores, caches and memory bandwidth.
* ``coordinator_resume_ms``: what that turn costs more right after a round than right after the same tokens' expert
  calls run in the coordinator's own process, as a local engine runs them. The coordinator's core sleeps while it
  waits, and the turn after runs slower; the local engine never waits, so its costs miss this. Its turn is cold too
  (its own expert calls stream weights through the caches), and that part its costs already hold.
* ``coordinator_layer_cores``, ``expert_cores`` (processes of several threads): how many cores the coordinator's
  layer and one expert call keep busy on average at a few row counts, in a process of those threads with the wait
  policy the plan deploys it with: where a call keeps one, the coordinator and a worker fit on two cores at once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import multiprocessing
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.synchronize import Event
from typing import Any

import torch
from torch import Tensor

from cluster.engine.calibrate import DECODE_ROWS as OP_DECODE_ROWS
from cluster.engine.calibrate import PREFILL_ROWS as OP_PREFILL_ROWS
from cluster.engine.calibrate import CoordinatorWeights, StreamedExperts, coordinator_ops, timed_with_cores
from cluster.engine_config import omp_runtime_env
from cluster.links.protocol import OP_WORK, LinkSpec
from cluster.links.shm import ShmCoordinatorEnd
from cluster.model.config import ModelConfig, parse_dtype
from cluster.model.experts import LocalExperts
from cluster.planning.plan import ModelSizes, cpu_wait_policy, split_experts
from workers.expert_loop import ExpertLoop
from workers.versioned_experts import VersionedExperts

ROUNDS = 200
ECHO_ROWS = 16  # rows per worker in a round: a decode step's share at a few dozen sequences
# A step's tokens whose expert phase is timed: decode batches, prefill chunks. 1 as well: a one-sequence step engages
# at most top-k workers, and the exchange measured at 8 tokens overstated it by 30-40% with 2 and 8 workers.
PHASE_TOKENS = (1, 8, 32, 256, 1024)
PHASE_SECONDS = 1.0  # time each (workers, tokens) point for about this long over all its passes
PHASE_MIN_ROUNDS = 10  # per pass
PHASE_PASSES = 3
STREAM_BYTES = 256 * 2**20  # expert weights cycled through, all workers together: more than a last-level cache
PHASE_MAX_LAYER_BYTES = 2**30  # a model whose one layer of experts is larger is not timed (the echo stands in)
PHASE_CONTEXT = 128  # keys per sequence in the coordinator's decode attention, as calibrate()'s default
# The coordinator's turn timed this many times right after expert calls in its own process, as a local engine's turn
# follows its experts: the baseline against which a turn after a round (a wait for the workers) is compared.
TURN_LOCAL_REPEATS = 20


class _EchoExperts:
    """Experts that return their rows: the loop's own cost, without any expert's."""

    latest = 0

    def holds(self, version: int) -> bool:
        return version == 0

    def run(self, version: int, layer: int, rows: Tensor, counts: list[int]) -> Tensor:
        return rows

    def in_use(self, oldest: int | None) -> None:
        pass

    def hint(self, version: int, layer: int, experts: list[int]) -> None:
        pass


def _serve(address: str, spec: LinkSpec, listening: Event, experts: tuple[int, int, int, int] | None = None,
           threads: int = 1) -> None:
    """A worker process: one expert loop until its links close and it is terminated. ``experts``: (local experts,
    layers, hidden, intermediate) of real shapes to hold, or None for the echo; ``threads``: its intra-op threads."""
    torch.set_num_threads(threads)
    held: Any = _EchoExperts()
    layers = 1
    if experts is not None:
        n_local, layers, hidden, intermediate = experts
        dtype = spec.torch_dtype
        held = VersionedExperts(0, LocalExperts(  # the worker's own class: its expert call, as it runs it
            tuple(tuple(range(n_local)) for _ in range(layers)),
            [torch.full((n_local, 2 * intermediate, hidden), 0.01, dtype=dtype) for _ in range(layers)],
            [torch.full((n_local, hidden, intermediate), 0.01, dtype=dtype) for _ in range(layers)]),
            n_local, torch.device("cpu"), worker_index=0)
    loop = ExpertLoop(address, spec, held, num_layers=layers, merge_wait_s=0.0)
    listening.set()
    loop.run()  # on this thread, whose intra-op thread count is set above


def _wait_policy_env(threads: int) -> dict[str, str]:
    """The environment variables that give a process of ``threads`` intra-op threads the plan's wait policy."""
    return dict(omp_runtime_env(cpu_wait_policy(threads)).get("env_vars", {}))


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """``variables`` set in this process's environment for the block (what a process spawned in it inherits)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _start_loops(spec: LinkSpec, count: int, experts: list[tuple[int, int, int, int]] | None = None,
                 threads: int = 1) -> tuple[list[Any], list[ShmCoordinatorEnd]]:
    """``count`` worker processes (``experts[w]`` for worker w, else echoes) of ``threads`` intra-op threads and a
    coordinator end to each. Workers of several threads get the passive OpenMP wait policy, as the plan gives them
    (docs/architecture.md "Threads"): a spawned process starts with this one's environment, before it loads torch."""
    context = multiprocessing.get_context("spawn")  # as fresh as a Ray worker; fork would copy this process
    run_id = uuid.uuid4().hex[:8]
    policy = _wait_policy_env(threads)
    procs, ends = [], []
    try:
        with _environment(policy):
            for w in range(count):
                address = f"moe-cluster/calibration-{run_id}/worker-{w}/{os.getpid()}"
                listening = context.Event()
                proc = context.Process(target=_serve, daemon=True, args=(
                    address, spec, listening, experts[w] if experts else None, threads))
                proc.start()
                procs.append((proc, listening, address))
        for proc, listening, address in procs:
            if not listening.wait(300):
                raise RuntimeError(f"link calibration: worker process {proc.pid} did not start")
            ends.append(ShmCoordinatorEnd(address, spec))
    except BaseException:
        _stop_loops([p for p, _, _ in procs], ends)
        raise
    return [p for p, _, _ in procs], ends


def _stop_loops(procs: list[Any], ends: list[ShmCoordinatorEnd]) -> None:
    for end in ends:
        end.close()
    for proc in procs:
        proc.terminate()
        proc.join(10)


def exchange_ms(hidden: int, dtype: str, workers: tuple[int, ...], rows: int = ECHO_ROWS,
                rounds: int = ROUNDS) -> dict[str, Any]:
    """{"exchange_ms": {W: ms of one layer's round trip to W workers}} for each W in ``workers``."""
    spec = LinkSpec(hidden=hidden, dtype=dtype, max_local=1)
    procs, ends = _start_loops(spec, max(workers))
    try:
        x = torch.randn(rows, hidden, dtype=spec.torch_dtype)
        outs = [torch.empty_like(x) for _ in ends]
        measured: dict[str, float] = {}
        tag = 0
        for count in workers:
            samples = []
            for _ in range(rounds + rounds // 10):  # the first tenth warms up
                started = time.perf_counter()
                for end, out in zip(ends[:count], outs, strict=False):
                    end.send(OP_WORK, layer=0, tag=tag, counts=[rows], rows=x, out=out)
                for end in ends[:count]:
                    end.recv_result(tag)
                samples.append(time.perf_counter() - started)
                tag += 1
            measured[str(count)] = 1000 * statistics.median(samples[rounds // 10:])
        return {"exchange_ms": measured, "exchange_rows": rows}
    finally:
        _stop_loops(procs, ends)


def expert_phase_ms(cfg: ModelConfig, dtype: str, workers: tuple[int, ...], tokens: tuple[int, ...] = PHASE_TOKENS,
                    seconds: float = PHASE_SECONDS, threads: int = 1, context: int = PHASE_CONTEXT) -> dict[str, Any]:
    """{"expert_phase_ms": {W: {T: ms}}, "coordinator_resume_ms": {W: {T: ms}}}: one layer's expert phase (send,
    the workers' expert calls, results back) with the E experts of ``cfg`` split over W worker processes of
    ``threads`` intra-op threads, at a step of T tokens routed at random; and what the coordinator's own turn of
    that layer costs more right after such a phase than right after the same expert calls in-process (``_phase``);
    {} when one layer of experts is
    larger than PHASE_MAX_LAYER_BYTES (the echo exchange stands in). ``context``: keys per sequence in the
    coordinator's decode attention."""
    layer_bytes = cfg.num_experts * ModelSizes.of(cfg, dtype).expert_bytes // cfg.num_layers
    if layer_bytes > PHASE_MAX_LAYER_BYTES:
        return {}
    layers = max(2, min(cfg.num_layers, -(-STREAM_BYTES // layer_bytes)))  # weights cycled through
    measured: dict[str, dict[str, float]] = {}
    resume: dict[str, dict[str, float]] = {}
    in_process = StreamedExperts(cfg, parse_dtype(dtype), torch.device("cpu"))  # the resume's baseline, every W
    for count in workers:
        split = split_experts(cfg.num_experts, count)
        spec = LinkSpec(hidden=cfg.hidden_size, dtype=dtype, max_local=max(len(w) for w in split))
        procs, ends = _start_loops(spec, len(split), [(len(w), layers, cfg.hidden_size, cfg.intermediate_size)
                                                      for w in split], threads)
        try:
            # PHASE_PASSES passes over the token counts, their median kept: a background burst (the kernel
            # compacting the memory just freed, another job) lasting a second inflates every round of one pass, and
            # the fastest pass is a lucky one (with 2 workers at 8 tokens, passes spread 6.9-8.4 ms here; a
            # minimum of 5.8 under-predicted that shape's step by 22%). Every pass routes the same tokens (one
            # seed per token count): passes differ only by disturbance.
            # The coordinator's turn on 1 thread: no idle thread of this process then spins (OpenMP's default
            # policy here) on the cores the workers need, as a deployed coordinator's passive threads do not.
            threads_here = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                coordinator = CoordinatorWeights.random(cfg, spec.torch_dtype, torch.device("cpu"))
                turns = {t: _whole_turn(*coordinator_ops(cfg, coordinator, t, context, decode=t in OP_DECODE_ROWS))
                         for t in tokens}
                passes = [{t: _phase(ends, split, spec, cfg, t, layers, seconds / PHASE_PASSES, turns[t], in_process)
                           for t in tokens} for _ in range(PHASE_PASSES)]
            finally:
                torch.set_num_threads(threads_here)
            measured[str(count)] = {str(t): statistics.median(p[t][0] for p in passes) for t in tokens}
            resume[str(count)] = {str(t): statistics.median(p[t][1] for p in passes) for t in tokens}
        finally:
            _stop_loops(procs, ends)
    return {"expert_phase_ms": measured, "coordinator_resume_ms": resume}


def routed_counts(tokens: int, top_k: int, num_experts: int, generator: torch.Generator) -> list[int]:
    """Rows per expert when ``tokens`` tokens each pick the top ``top_k`` of random logits: a router with no
    preference, as the plan's step model assumes (cluster/planning/plan.py ``worker_layer_ms``)."""
    logits = torch.randn(tokens, num_experts, generator=generator)  # (T, E)
    chosen = logits.topk(top_k, dim=-1).indices.flatten()  # (T * k,)
    return torch.bincount(chosen, minlength=num_experts).tolist()


def _whole_turn(layer: Callable[[], None], bookkeeping: Callable[[], None]) -> Callable[[], None]:
    """The coordinator's whole turn of a layer: its ops, then the MoE bookkeeping (calibrate.coordinator_ops)."""
    def turn() -> None:
        layer()
        bookkeeping()
    return turn


def _phase(ends: list[ShmCoordinatorEnd], split: list[list[int]], spec: LinkSpec, cfg: ModelConfig, tokens: int,
           layers: int, seconds: float, turn: Callable[[], None], in_process: StreamedExperts) -> tuple[
               float, float]:
    """(median ms of a layer's round, ms the coordinator's turn costs more after a round than after the same
    tokens' expert calls in its own process).

    A round: each worker that has rows gets its experts' rows, then every result comes back; over ``seconds`` or
    PHASE_MIN_ROUNDS rounds after one warm-up cycle through the layers, whichever is longer. Between rounds the
    coordinator takes its turn of the layer (``turn``: its ops and the MoE bookkeeping at these tokens,
    calibrate.coordinator_ops), as long as a real one: the workers sleep through it and wake to compute, as in a
    step. The turn is timed too, and so is the same turn right after ``in_process`` ran this many tokens' expert
    calls (``TURN_LOCAL_REPEATS`` times before the rounds), as a local engine's turn follows its own experts.

    Both are cold: expert weights streamed through the caches evict the turn's. The local engine's costs hold that
    much. After a round the core has also slept, and that costs more: on the AMD EPYC VM a turn at 1, 8 and 32
    tokens took 0.74, 0.77-0.85 and 1.54-1.56 ms back to back, 0.86-1.00, 1.52-1.56 and 2.22-2.23 ms after
    in-process expert calls, and 1.14-1.23, 1.60-1.74 and 2.31-2.38 ms after them and a 1.5 ms sleep (a probe, not
    kept). Measured against back-to-back turns, the resume counted the caches twice and over-predicted one
    sequence on 2 workers by 17-24%."""
    generator = torch.Generator().manual_seed(tokens)
    rows = torch.randn(tokens * cfg.experts_per_token, spec.hidden, dtype=spec.torch_dtype)  # (T * k, H)
    local = []
    for _ in range(TURN_LOCAL_REPEATS + 1):  # the first warms up
        for expert_rows in rows.split(routed_counts(tokens, cfg.experts_per_token, cfg.num_experts, generator)):
            if len(expert_rows):  # an expert with no rows is not called
                in_process(expert_rows)
        started = time.perf_counter()
        turn()
        local.append(time.perf_counter() - started)
    out = torch.empty_like(rows)
    samples: list[float] = []
    turns: list[float] = []
    tags = [0] * len(ends)  # per link, as a coordinator counts them (cluster/moe/linked_experts.py)
    layer, started_all = 0, time.perf_counter()
    while len(samples) < PHASE_MIN_ROUNDS + layers or time.perf_counter() - started_all < seconds:
        counts = routed_counts(tokens, cfg.experts_per_token, cfg.num_experts, generator)
        started = time.perf_counter()
        turn()  # the coordinator's turn: workers sleep
        turns.append(time.perf_counter() - started)
        started = time.perf_counter()
        sent, first = [], 0
        for w, (end, experts) in enumerate(zip(ends, split, strict=True)):
            worker_counts = [counts[e] for e in experts]
            n = sum(worker_counts)
            if n:  # as a coordinator does: a worker without rows is sent nothing
                end.send(OP_WORK, layer=layer, tag=tags[w], counts=worker_counts, rows=rows[first:first + n],
                         out=out[first:first + n])
                sent.append(w)
                first += n
        for w in sent:
            ends[w].recv_result(tags[w])
            tags[w] += 1
        samples.append(time.perf_counter() - started)
        layer = (layer + 1) % layers
    # the first cycle through the layers warms up; a turn follows the round before it (the first, none)
    resumed = statistics.median(turns[layers + 1:]) - statistics.median(local[1:])
    return 1000 * statistics.median(samples[layers:]), 1000 * max(0.0, resumed)


def cores_busy(cfg: ModelConfig, dtype: str, threads: int, rows: tuple[int, ...] = OP_DECODE_ROWS + OP_PREFILL_ROWS,
               context: int = PHASE_CONTEXT, repeats: int = 5) -> dict[str, Any]:
    """{"coordinator_layer_cores": {R: cores}, "expert_cores": {R: cores}}: the cores the coordinator's layer ops
    (calibrate.coordinator_ops: decode at DECODE_ROWS, else one prompt) and one expert call (weights streamed)
    keep busy on average at R rows, each its process's CPU time over its time, in a process of ``threads``
    intra-op threads with the wait policy the plan gives such processes (passive: an idle thread sleeps; under
    OpenMP's default it would spin, and count, as it holds the core). {} with one thread: one core.

    A call that keeps one core busy runs beside the other side's on a second core; one that keeps them all runs
    alone (cluster/planning/plan.py ``parallel_share``). On the AMD EPYC VM, 2 threads, passive: an expert on 1-4
    rows kept 0.99-1.0 busy (a small matmul runs on one thread), on 6-64 rows 1.65-1.78, 1.87 on 256; the
    coordinator's layer 0.86-1.17 at 1-16 sequences, 1.57 on a 256-token prompt."""
    if threads <= 1:
        return {}
    context_spawn = multiprocessing.get_context("spawn")  # a fresh process reads the wait policy as it starts
    with _environment(_wait_policy_env(threads)), \
            concurrent.futures.ProcessPoolExecutor(1, mp_context=context_spawn) as process:
        return process.submit(_cores_busy_here, cfg, dtype, threads, rows, context, repeats).result()


def _cores_busy_here(cfg: ModelConfig, dtype: str, threads: int, rows: tuple[int, ...], context: int,
                     repeats: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    device, torch_dtype = torch.device("cpu"), parse_dtype(dtype)
    coordinator = CoordinatorWeights.random(cfg, torch_dtype, device)
    experts = StreamedExperts(cfg, torch_dtype, device)
    out: dict[str, dict[str, float]] = {"coordinator_layer_cores": {}, "expert_cores": {}}
    with torch.inference_mode():
        for r in rows:
            layer, _ = coordinator_ops(cfg, coordinator, r, context, decode=r in OP_DECODE_ROWS)
            x = torch.randn(r, cfg.hidden_size, dtype=torch_dtype)  # (R, H)
            out["coordinator_layer_cores"][str(r)] = timed_with_cores(layer, device, repeats)[1]
            out["expert_cores"][str(r)] = timed_with_cores(functools.partial(experts, x), device,
                                                           max(repeats, experts.copies))[1]
    return out


def link_costs(cfg: ModelConfig, dtype: str, workers: tuple[int, ...], context: int = PHASE_CONTEXT) -> dict[str, Any]:
    """The exchange and the expert phases for ``workers`` worker counts, and the cores busy: what
    calibrate(also=...) caches with the op costs. The workers have this process's intra-op thread count (the
    calibration's, keyed with its costs: `moe-cluster plan` sets it to the plan's worker threads). ``context``: as
    calibrate's, keys per sequence in decode attention."""
    threads = torch.get_num_threads()
    return (exchange_ms(cfg.hidden_size, dtype, workers)
            | expert_phase_ms(cfg, dtype, workers, threads=threads, context=context)
            | cores_busy(cfg, dtype, threads, context=context))
