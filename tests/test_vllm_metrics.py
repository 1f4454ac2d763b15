"""The HTTP server's /metrics under vLLM's names: what an engine replica records, rendered for every replica, read
back by prometheus_client's own parser (what Prometheus-side tools see), with the series vLLM users' dashboards,
alerts and autoscalers query."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cluster.engine.api import EngineStats
from cluster.engine.sequence import RequestMetrics
from router_service.metrics import EngineMetrics
from router_service.vllm_metrics import SERIES, render, series_names

# What vLLM users' tools read (the issue's list, plus the rest of what we mirror).
DOCUMENTED = {"vllm:kv_cache_usage_perc", "vllm:num_requests_waiting", "vllm:num_requests_running",
              "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
              "vllm:request_decode_time_seconds", "vllm:e2e_request_latency_seconds", "vllm:prefix_cache_queries",
              "vllm:prefix_cache_hits", "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:num_preemptions",
              "vllm:request_success"}


def replica(engine_id: str, used: int, hits: int) -> EngineMetrics:
    metrics = EngineMetrics("demo", engine_id)
    timings = RequestMetrics(arrival_time=10.0, first_scheduled_time=10.5, first_token_time=11.25,
                             finished_time=12.0, inter_token_latencies=[0.25, 0.25, 0.25])
    metrics.observe_request(1.25, 2.0, 4, ["length"], timings)
    metrics.sample(EngineStats(num_running=2, num_waiting=3, kv_blocks_total=200, kv_blocks_used=used,
                               prefix_cache_queries_total=400, prefix_cache_hits_total=hits))
    return metrics


def test_every_replicas_vllm_series_parse_with_their_values() -> None:
    text = render([replica("e1", 50, 300).vllm.snapshot(), replica("e2", 100, 0).vllm.snapshot()])
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families.keys() >= DOCUMENTED  # (the parser names a counter's family without _total)
    assert all(families[name].type == SERIES[name][0] for name in DOCUMENTED)
    samples = {(s.name, s.labels.get("engine"), s.labels.get("le")): s.value
               for f in families.values() for s in f.samples}
    assert samples[("vllm:kv_cache_usage_perc", "e1", None)] == 0.25
    assert samples[("vllm:kv_cache_usage_perc", "e2", None)] == 0.5
    assert samples[("vllm:num_requests_waiting", "e1", None)] == 3
    assert samples[("vllm:prefix_cache_hits_total", "e1", None)] == 300
    assert samples[("vllm:prefix_cache_queries_total", "e2", None)] == 400
    assert samples[("vllm:inter_token_latency_seconds_count", "e1", None)] == 3  # one per token step
    assert samples[("vllm:inter_token_latency_seconds_sum", "e1", None)] == 0.75
    assert samples[("vllm:inter_token_latency_seconds_bucket", "e1", "0.2")] == 0
    assert samples[("vllm:inter_token_latency_seconds_bucket", "e1", "0.3")] == 3
    assert samples[("vllm:request_queue_time_seconds_sum", "e1", None)] == 0.5
    assert samples[("vllm:request_prefill_time_seconds_sum", "e1", None)] == 0.75
    assert samples[("vllm:request_decode_time_seconds_sum", "e1", None)] == 0.75
    assert samples[("vllm:time_to_first_token_seconds_sum", "e2", None)] == 1.25
    success = [s for s in families["vllm:request_success"].samples if s.name == "vllm:request_success_total"]
    assert {s.labels["finished_reason"] for s in success} == {"length"}
    assert {s.labels["model_name"] for f in families.values() for s in f.samples} == {"demo"}
    names = {s.name for f in families.values() for s in f.samples if not s.name.endswith("_created")}
    assert names <= series_names()
