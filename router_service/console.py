"""What ``moe-cluster serve`` prints while it serves: every ``interval_s`` with traffic, one line per engine
replica (running and waiting requests, prompt and generation throughput over the interval, KV cache usage), as
vLLM does; with ``--log-requests``, one line per finished or refused request as well. The engine replicas keep
their counters and request lines (EngineDeployment.console_report); this thread asks them and prints."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("moe_cluster.serve")
REQUEST_POLL_S = 1.0  # with --log-requests, how often the request lines are collected
REPORT_TIMEOUT_S = 5.0


@dataclass
class Sample:
    at: float
    prompt_tokens: int
    generation_tokens: int


def stats_line(engine_id: str, stats: dict[str, Any], before: Sample | None, now: Sample) -> str:
    """One engine replica's line: what it runs now, and its throughput since ``before``."""
    if before is None or now.at <= before.at:
        prompt_tps = generation_tps = 0.0
    else:
        elapsed = now.at - before.at
        prompt_tps = (now.prompt_tokens - before.prompt_tokens) / elapsed
        generation_tps = (now.generation_tokens - before.generation_tokens) / elapsed
    total = stats.get("kv_blocks_total") or 0
    kv = 100.0 * (stats.get("kv_blocks_used") or 0) / total if total else 0.0
    return (f"{engine_id}: running {stats.get('num_running', 0)} reqs, waiting {stats.get('num_waiting', 0)} reqs, "
            f"prompt throughput {prompt_tps:.1f} tokens/s, generation throughput {generation_tps:.1f} tokens/s, "
            f"KV cache usage {kv:.1f}%, preemptions {stats.get('num_preemptions', 0)}")


class ConsoleStats:
    """A daemon thread: every ``interval_s`` (0: never) a stats line per engine replica while there is traffic
    (and one more once it stops); with ``log_requests``, the request lines every REQUEST_POLL_S."""

    def __init__(self, app_name: str, interval_s: float, log_requests: bool, stop: threading.Event) -> None:
        self.app_name = app_name
        self.interval_s = interval_s
        self.log_requests = log_requests
        self.stop = stop
        self.samples: dict[str, Sample] = {}
        self.busy: dict[str, bool] = {}
        self.thread = threading.Thread(target=self._run, name="moe-console-stats", daemon=True)

    def start(self) -> None:
        if self.interval_s > 0 or self.log_requests:
            self.thread.start()

    def _run(self) -> None:
        from ray import serve

        from router_service.engine_deployment import DEPLOYMENT_NAME

        handle = serve.get_deployment_handle(DEPLOYMENT_NAME, self.app_name)
        poll = REQUEST_POLL_S if self.log_requests else self.interval_s
        if self.interval_s > 0:
            poll = min(poll, self.interval_s)
        next_stats = time.monotonic() + self.interval_s
        while not self.stop.wait(poll):
            with_stats = self.interval_s > 0 and time.monotonic() >= next_stats
            if with_stats:
                next_stats += self.interval_s * max(1, int((time.monotonic() - next_stats) // self.interval_s + 1))
            try:
                reports = handle.broadcast("console_report").results(timeout_s=REPORT_TIMEOUT_S)
            except Exception as err:  # an engine replica restarting, the app going away: say so at debug only
                log.debug("console stats: no report (%s)", err)
                continue
            for report in sorted(reports, key=lambda r: str(r["engine_id"])):
                self._print(report, with_stats)

    def _print(self, report: dict[str, Any], with_stats: bool) -> None:
        engine_id = str(report["engine_id"])
        for line in report.get("requests", []):
            log.info("%s", line)
        stats = report.get("stats")
        if not with_stats or stats is None:
            return
        now = Sample(time.monotonic(), int(stats.get("prompt_tokens_total", 0)),
                     int(stats.get("generation_tokens_total", 0)))
        before = self.samples.get(engine_id)
        self.samples[engine_id] = now
        busy = bool(stats.get("num_running") or stats.get("num_waiting")) or (
            before is not None and (now.prompt_tokens, now.generation_tokens)
            != (before.prompt_tokens, before.generation_tokens))
        if busy or self.busy.get(engine_id):  # traffic, or the first idle interval after it
            log.info("%s", stats_line(engine_id, stats, before, now))
        self.busy[engine_id] = busy
