"""``moe-cluster expert-load`` against the package's real server: the load it reads from /metrics is the routing of
the same requests in a local engine (the reference), per expert and per worker, and it draws it as a PNG."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from cluster.engine.sampling import SamplingParams
from cluster.moe.expert_map import ExpertMap
from router_service.cli import main
from router_service.expert_load import ExpertLoad, metrics_url, read_load
from tests.serving.conftest import Served, app_args

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France?",
           "Once upon a time there was a small model"]
MAX_TOKENS = 8


def current_load(served: Served) -> ExpertLoad:
    try:
        return read_load(served.metrics).cumulative
    except ValueError:  # no request served yet: no expert series
        return ExpertLoad([])


def test_expert_load_reads_what_the_server_routed(served: Served, tmp_path: Path) -> None:
    before = current_load(served)
    reference_before = served.reference.stats().tokens_per_expert
    for prompt in PROMPTS:
        reply = httpx.post(f"{served.http}/v1/completions", timeout=120, json={
            "model": served.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
    for prompt in PROMPTS:  # one at a time, as the server ran them
        served.reference.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    reference = [[now - was for now, was in zip(row_now, row_was, strict=True)]
                 for row_now, row_was in zip(served.reference.stats().tokens_per_expert, reference_before,
                                             strict=True)]
    total = sum(map(sum, reference))
    assert total > 0
    # The pool's placement: contiguous, experts_per_worker from the app's arguments.
    placement = ExpertMap.contiguous(len(reference[0]), app_args(Path("."))["pool_options"]["experts_per_worker"],
                                     len(reference)).layers
    by_worker = {w: float(sum(reference[layer][e] for layer in range(len(reference)) for e in placement[layer][w]))
                 for w in range(len(placement[0]))}
    deadline = time.monotonic() + 60  # Ray exports what the replicas sampled every few seconds
    while True:
        load = current_load(served).since(before)
        if (sum(map(sum, load.expert_rows)) >= total and sum(load.worker_rows.values()) >= total) or \
                time.monotonic() > deadline:
            break
        time.sleep(1)
    assert load.expert_rows == reference
    assert load.worker_rows == by_worker

    png = tmp_path / "load.png"
    assert main(["expert-load", served.metrics, "--out", str(png)]) == 0
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert png.read_bytes().startswith(b"\x89PNG") and width > 600 and height > 200
    windowed = tmp_path / "window.png"  # scrapes through a window: a third panel follows the imbalance gauge
    assert main(["expert-load", served.metrics, "--out", str(windowed), "--window", "2"]) == 0
    window_height, window_width, _ = matplotlib.image.imread(windowed).shape
    assert window_height == height and window_width > width


def test_an_unreachable_server_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["expert-load", "127.0.0.1:1", "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read metrics from http://127.0.0.1:1/metrics" in err[0]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(("url", "resolved"), [
    ("127.0.0.1:8080", "http://127.0.0.1:8080/metrics"),
    ("http://host:8080/", "http://host:8080/metrics"),
    ("https://host/prom/metrics", "https://host/prom/metrics"),
])
def test_metrics_url(url: str, resolved: str) -> None:
    assert metrics_url(url) == resolved


def test_a_bad_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="metrics URL must be http"):
        metrics_url("ftp://host:8080")
