"""Engine metrics through ``ray.util.metrics``: Ray exports them in Prometheus format on each node's metrics
port (``ray start --metrics-export-port``). docs/observability.md lists them."""

from __future__ import annotations

from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

from cluster.engine.api import EngineStats
from cluster.engine.sequence import RequestMetrics
from cluster.moe.eplb import imbalance
from router_service.vllm_metrics import VllmSeries

ITL_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0]
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


class EngineMetrics:
    """One set per engine replica; every series carries the replica's ``engine`` tag."""

    def __init__(self, model: str, engine_id: str) -> None:
        self.tags = {"model": model, "engine": engine_id}
        keys = ("model", "engine")
        self.ttft = Histogram("moe_cluster_time_to_first_token_seconds", "Time from arrival to the first token",
                              boundaries=LATENCY_BUCKETS, tag_keys=keys)
        self.tpot = Histogram("moe_cluster_time_per_output_token_seconds",
                              "Mean time between output tokens of a request", boundaries=TPOT_BUCKETS, tag_keys=keys)
        self.e2e = Histogram("moe_cluster_e2e_request_latency_seconds", "Time from arrival to the last token",
                             boundaries=LATENCY_BUCKETS, tag_keys=keys)
        self.running = Gauge("moe_cluster_requests_running", "Sequences in the running batch", tag_keys=keys)
        self.waiting = Gauge("moe_cluster_requests_waiting", "Sequences waiting for admission", tag_keys=keys)
        self.kv_used = Gauge("moe_cluster_kv_blocks_used", "KV cache blocks in use", tag_keys=keys)
        self.kv_total = Gauge("moe_cluster_kv_blocks_total", "KV cache blocks in the pool", tag_keys=keys)
        self.preemptions = Counter("moe_cluster_preemptions_total", "Sequences preempted for recompute",
                                   tag_keys=keys)
        self.prompt_tokens = Counter("moe_cluster_prompt_tokens_total", "Prompt tokens prefilled (at the first token)",
                                     tag_keys=keys)
        self.generation_tokens = Counter("moe_cluster_generation_tokens_total", "Generated tokens", tag_keys=keys)
        self.expert_tokens = Counter("moe_cluster_expert_tokens_total", "Token rows routed to each expert",
                                     tag_keys=(*keys, "layer", "expert"))
        self.expert_wait = Gauge("moe_cluster_expert_wait_seconds_per_step",
                                 "Mean time a forward step spent sending rows to the expert pool and waiting for "
                                 "their results, since the last sample", tag_keys=keys)
        self.requests = Counter("moe_cluster_requests_total", "Finished requests by finish reason",
                                tag_keys=(*keys, "finish_reason"))
        # vLLM's meanings (docs/observability.md maps each to its vllm: name on the HTTP server's /metrics).
        self.itl = Histogram("moe_cluster_inter_token_latency_seconds",
                             "Time between a request's successive token steps, one sample per step",
                             boundaries=ITL_BUCKETS, tag_keys=keys)
        self.queue_time = Histogram("moe_cluster_request_queue_time_seconds", "Arrival to first scheduled",
                                    boundaries=LATENCY_BUCKETS, tag_keys=keys)
        self.prefill_time = Histogram("moe_cluster_request_prefill_time_seconds", "First scheduled to first token",
                                      boundaries=LATENCY_BUCKETS, tag_keys=keys)
        self.decode_time = Histogram("moe_cluster_request_decode_time_seconds", "First token to last token",
                                     boundaries=LATENCY_BUCKETS, tag_keys=keys)
        self.kv_usage = Gauge("moe_cluster_kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full)",
                              tag_keys=keys)
        self.prefix_queries = Counter("moe_cluster_prefix_cache_queries_total",
                                      "Context tokens looked up in the prefix cache at admission", tag_keys=keys)
        self.prefix_hits = Counter("moe_cluster_prefix_cache_hits_total",
                                   "Context tokens found in the prefix cache (not computed again)", tag_keys=keys)
        self.vllm = VllmSeries(model, engine_id)  # the same, for the HTTP server's /metrics
        self._last: EngineStats | None = None

    def observe_request(self, ttft: float | None, e2e: float | None, completion_tokens: int,
                        finish_reasons: list[str], timings: RequestMetrics | None = None) -> None:
        if ttft is not None:
            self.ttft.observe(ttft, self.tags)
            self.vllm.observe("vllm:time_to_first_token_seconds", ttft)
        if e2e is not None:
            self.e2e.observe(e2e, self.tags)
            self.vllm.observe("vllm:e2e_request_latency_seconds", e2e)
            if ttft is not None and completion_tokens > 1:
                self.tpot.observe((e2e - ttft) / (completion_tokens - 1), self.tags)
        for reason in finish_reasons:
            self.requests.inc(1, self.tags | {"finish_reason": reason})
            self.vllm.finished(reason)
        if timings is None:
            return
        for gap in timings.inter_token_latencies:
            self.itl.observe(gap, self.tags)
            self.vllm.observe("vllm:inter_token_latency_seconds", gap)
        for histogram, name, value in ((self.queue_time, "queue", timings.queue_time),
                                       (self.prefill_time, "prefill", timings.prefill_time),
                                       (self.decode_time, "decode", timings.decode_time)):
            if value is not None:
                histogram.observe(value, self.tags)
                self.vllm.observe(f"vllm:request_{name}_time_seconds", value)

    def sample(self, stats: EngineStats) -> None:
        """Gauges from the latest engine stats, counters by their increase since the last sample."""
        self.running.set(stats.num_running, self.tags)
        self.waiting.set(stats.num_waiting, self.tags)
        self.kv_used.set(stats.kv_blocks_used, self.tags)
        self.kv_total.set(stats.kv_blocks_total, self.tags)
        usage = stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0
        self.kv_usage.set(usage, self.tags)
        for name, value in (("vllm:num_requests_running", stats.num_running),
                            ("vllm:num_requests_waiting", stats.num_waiting), ("vllm:kv_cache_usage_perc", usage),
                            ("vllm:prefix_cache_queries", stats.prefix_cache_queries_total),
                            ("vllm:prefix_cache_hits", stats.prefix_cache_hits_total),
                            ("vllm:num_preemptions", stats.num_preemptions),
                            ("vllm:prompt_tokens", stats.prompt_tokens_total),
                            ("vllm:generation_tokens", stats.generation_tokens_total)):
            self.vllm.set(name, value)
        last = self._last
        self._increase(self.prefix_queries, stats.prefix_cache_queries_total,
                       last.prefix_cache_queries_total if last else 0)
        self._increase(self.prefix_hits, stats.prefix_cache_hits_total, last.prefix_cache_hits_total if last else 0)
        self._increase(self.preemptions, stats.num_preemptions, last.num_preemptions if last else 0)
        self._increase(self.prompt_tokens, stats.prompt_tokens_total, last.prompt_tokens_total if last else 0)
        self._increase(self.generation_tokens, stats.generation_tokens_total,
                       last.generation_tokens_total if last else 0)
        for layer, row in enumerate(stats.tokens_per_expert):
            for expert, count in enumerate(row):
                before = last.tokens_per_expert[layer][expert] if last and last.tokens_per_expert else 0
                self._increase(self.expert_tokens, count, before, {"layer": str(layer), "expert": str(expert)})
        steps = stats.backend.get("steps", 0.0) - (last.backend.get("steps", 0.0) if last else 0.0)
        if steps > 0:
            spent = sum(stats.backend.get(k, 0.0) - (last.backend.get(k, 0.0) if last else 0.0)
                        for k in ("route_and_send", "wait"))
            self.expert_wait.set(spent / steps, self.tags)
        self._last = stats

    def _increase(self, counter: Counter, now: float, before: float, extra: dict[str, str] | None = None) -> None:
        if now > before:
            counter.inc(now - before, self.tags | (extra or {}))


class IngressMetrics:
    """The ingress's own series, one set per ingress replica."""

    def __init__(self, model: str) -> None:
        self.tags = {"model": model}
        self.resumed = Counter("moe_cluster_requests_resumed_total",
                               "In-flight requests resumed on another engine replica after theirs died",
                               tag_keys=("model",))


class PoolMetrics:
    """The expert pool's workers, exported once by the pool's replica (whatever number of coordinators)."""

    def __init__(self, model: str, pool_id: str) -> None:
        self.tags = {"model": model, "pool": pool_id}
        keys = ("model", "pool", "worker")
        self.rows = Counter("moe_cluster_worker_rows_total", "Rows computed by each expert worker", tag_keys=keys)
        self.calls = Counter("moe_cluster_worker_expert_calls_total",
                             "Grouped expert calls of each worker (one per layer message, or fewer when rows from "
                             "several coordinators were merged)", tag_keys=keys)
        self.messages = Counter("moe_cluster_worker_messages_total", "Layer messages answered by each worker",
                                tag_keys=keys)
        self.rows_per_call = Gauge("moe_cluster_worker_rows_per_call",
                                   "Rows per grouped expert call of each worker, since the last sample", tag_keys=keys)
        self.imbalance = Gauge("moe_cluster_worker_load_imbalance",
                               "Rows of the most loaded expert worker over the mean, layer by layer, since the last "
                               "sample (1 = perfectly even)", tag_keys=("model", "pool"))
        self.rebalances = Counter("moe_cluster_rebalances_total", "Expert map changes made by rebalancing",
                                  tag_keys=("model", "pool"))
        self.map_version = Gauge("moe_cluster_expert_map_version",
                                 "Version of the expert pool's committed expert map (rebalances and resizes bump it)",
                                 tag_keys=("model", "pool"))
        self.num_workers = Gauge("moe_cluster_expert_workers", "Expert workers of the pool's committed map",
                                 tag_keys=("model", "pool"))
        self.resizes = Counter("moe_cluster_pool_resizes_total", "Resizes of the expert pool (elastic pool)",
                               tag_keys=("model", "pool"))
        # Issue 23, the expert cache (workers/expert_cache.py); the counters stay at zero without one.
        self.cache_hits = Counter("moe_cluster_expert_cache_hits_total",
                                  "Experts a worker's call needed that were resident (or already loading) in its "
                                  "expert cache", tag_keys=keys)
        self.cache_misses = Counter("moe_cluster_expert_cache_misses_total",
                                    "Experts a worker's call needed that had to be loaded into its expert cache",
                                    tag_keys=keys)
        self.prefetches = Counter("moe_cluster_expert_prefetch_total",
                                  "Experts loaded ahead on a prefetch hint, by outcome: used by the call the hint "
                                  "was for, or wasted (not used, or evicted first)", tag_keys=(*keys, "outcome"))
        self.cache_bytes_loaded = Counter("moe_cluster_expert_cache_loaded_bytes_total",
                                          "Bytes copied from the host store into expert cache slots", tag_keys=keys)
        self.cache_stall = Counter("moe_cluster_expert_cache_stall_seconds_total",
                                   "Seconds worker calls waited for an expert to finish loading", tag_keys=keys)
        self.resident_bytes = Gauge("moe_cluster_worker_expert_resident_bytes",
                                    "Bytes of expert weights resident on each worker (its cache slots with an expert "
                                    "cache, else every hosted expert)", tag_keys=keys)
        self._last: dict[str, dict[str, Any]] = {}
        self._rebalances = 0
        self._resizes = 0

    def sample_pool(self, map_version: int, num_workers: int, resizes: int) -> None:
        """The pool's shape now: its map version, its workers, and resizes so far."""
        self.map_version.set(map_version, self.tags)
        self.num_workers.set(num_workers, self.tags)
        if resizes > self._resizes:
            self.resizes.inc(resizes - self._resizes, self.tags)
            self._resizes = resizes

    def sample(self, workers: list[dict[str, Any]], rebalances: int = 0) -> None:
        """Counters by their increase since the last sample; the imbalance of the rows in between."""
        if rebalances > self._rebalances:
            self.rebalances.inc(rebalances - self._rebalances, self.tags)
            self._rebalances = rebalances
        layer_rows = self.layer_rows(workers)
        if layer_rows and any(map(any, layer_rows)):
            self.imbalance.set(imbalance(layer_rows), self.tags)
        for stats in workers:
            if "rows" not in stats:
                continue  # a worker that did not answer
            worker = str(stats["worker_index"])
            # A replaced worker starts from zero: count from there.
            last = self._last.get(worker)
            if last is None or last.get("generation") != stats["generation"]:
                last = {"rows": 0, "calls": 0, "messages": 0}
            tags = self.tags | {"worker": worker}
            new = {k: stats[k] - last[k] for k in ("rows", "calls", "messages")}
            for counter, key in ((self.rows, "rows"), (self.calls, "calls"), (self.messages, "messages")):
                if new[key] > 0:
                    counter.inc(new[key], tags)
            if new["calls"] > 0:
                self.rows_per_call.set(new["rows"] / new["calls"], tags)
            self._sample_cache(stats, last, tags)
            self._last[worker] = stats

    def _sample_cache(self, stats: dict[str, Any], last: dict[str, Any], tags: dict[str, str]) -> None:
        """Issue 23: the expert cache's counters by their increase; the resident expert bytes."""
        if "expert_bytes" in stats:
            self.resident_bytes.set(stats["expert_bytes"], tags)
        for counter, key, extra in (
                (self.cache_hits, "expert_cache_hits", {}), (self.cache_misses, "expert_cache_misses", {}),
                (self.prefetches, "expert_cache_prefetch_used", {"outcome": "used"}),
                (self.prefetches, "expert_cache_prefetch_wasted", {"outcome": "wasted"}),
                (self.cache_bytes_loaded, "expert_cache_bytes_loaded", {}),
                (self.cache_stall, "expert_cache_stall_s", {})):
            if key in stats and stats[key] - last.get(key, 0) > 0:
                counter.inc(stats[key] - last.get(key, 0), tags | extra)

    def layer_rows(self, workers: list[dict[str, Any]]) -> list[list[int]]:
        """[layer][worker] rows computed since the last sample, from each worker's rows per [layer][expert] (a
        replaced worker counts from zero); read before ``sample`` moves its baseline."""
        answered = [s for s in workers if "rows_per_expert" in s]
        if not answered:
            return []
        out = [[0] * len(answered) for _ in answered[0]["rows_per_expert"]]
        for i, stats in enumerate(answered):
            last = self._last.get(str(stats["worker_index"]))
            before = last.get("rows_per_expert") if last and last.get("generation") == stats["generation"] else None
            for layer, row in enumerate(stats["rows_per_expert"]):
                out[layer][i] = sum(row) - (sum(before[layer]) if before else 0)
        return out
