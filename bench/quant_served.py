"""Held-out perplexity of quantized experts measured through the served API, the lm-evaluation-harness way:
``POST /v1/completions`` with ``echo: true, logprobs: 0, max_tokens: 1``, the prompt tokens' log-probabilities summed.

    python -m bench.quant_served [--model cluster/demo_model] [--text tests/data/kjv_jonah.txt]

One Ray Serve app at a time on a local Ray, the cluster engine (2 expert workers x 4 experts, quantized on the
workers): fp32, int8, int4 g64 and g128 quantized at load, and the int4 g64 checkpoint written by
``moe-cluster quantize`` served as it is (no flag) - which must give the same perplexity as quantizing at load.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import free_port, machine, progress, table, write_section
from bench.quant import DEFAULT_MODEL, DEFAULT_TEXT, load_average, shown

SERVED = "demo"


def served_logprobs(base: str, text: str) -> list[float]:
    import httpx

    body = {"model": SERVED, "prompt": text, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 0}
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=600)
    response.raise_for_status()
    reply = response.json()
    prompt_tokens = reply["usage"]["prompt_tokens"]
    values = reply["choices"][0]["logprobs"]["token_logprobs"][:prompt_tokens]
    return [v for v in values if v is not None]  # the first (BOS) has none


def serve_perplexity(model: Path, engine_options: dict[str, Any], documents: list[str], http_port: int) -> float:
    from ray import serve

    from router_service.app import build_app

    app_args = {"model": str(model), "served_model_name": SERVED, "engine": "cluster", "num_engines": 1,
                "engine_options": {"max_num_seqs": 8, "kv_cache_gib": 0.25} | engine_options,
                "pool_options": {"experts_per_worker": 4, "threads_per_worker": 1}}
    serve.run(build_app(app_args), name="quant", route_prefix="/")
    try:
        logprobs = [lp for doc in documents for lp in served_logprobs(f"http://127.0.0.1:{http_port}", doc)]
    finally:
        serve.delete("quant")
    return math.exp(-sum(logprobs) / len(logprobs))


def main(argv: list[str] | None = None) -> int:
    import ray
    from ray import serve

    from cluster.model.quant import ExpertQuantization
    from cluster.model.quantize_checkpoint import quantize_checkpoint
    from router_service.serve_config import grpc_servicer_functions

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    args = parser.parse_args(argv)
    documents = [line.strip() for line in args.text.read_text().splitlines() if line.strip()]
    before = load_average()
    progress(f"{before} before (this machine is shared with other jobs right now)")
    quantized = Path(tempfile.mkdtemp(prefix="moe-quant-")) / "int4-g64"
    quantize_checkpoint(args.model, quantized, ExpertQuantization(4, 64), progress=False)
    variants: list[tuple[str, Path, dict[str, Any]]] = [
        ("fp32", args.model, {}),
        ("int8 (at load)", args.model, {"quantize_experts": "int8"}),
        ("int4 g128 (at load)", args.model, {"quantize_experts": "int4", "quantize_group_size": 128}),
        ("int4 g64 (at load)", args.model, {"quantize_experts": "int4", "quantize_group_size": 64}),
        ("int4 g64 (`moe-cluster quantize` output)", quantized, {}),
    ]
    http_port = free_port()
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options={"port": free_port(), "grpc_servicer_functions": grpc_servicer_functions()})
    results: list[tuple[str, float]] = []
    try:
        for label, model, options in variants:
            progress(f"serving {label}")
            results.append((label, serve_perplexity(model, options, documents, http_port)))
            progress(f"{label}: perplexity {results[-1][1]:.4f}")
    finally:
        serve.shutdown()
        ray.shutdown()
    after = load_average()
    base = results[0][1]
    rows = [[label, f"{ppl:.4f}", f"{100 * (ppl / base - 1):+.2f}%"] for label, ppl in results]
    derived = [f"{label}: {ppl:.3f} ({100 * (ppl / base - 1):+.2f}% vs fp32 {base:.3f})" for label, ppl in results[1:]]
    command = (f"python -m bench.quant_served --model {shown(args.model, DEFAULT_MODEL)} "
               f"--text {shown(args.text, DEFAULT_TEXT)}")
    body = (f"`{command}`\n\nMachine: {machine()}. Shared with other jobs during this run: {before} before, {after} "
            f"after (perplexity does not depend on it). Model {args.model.name}, text {args.text.name} "
            f"({len(documents)} documents), cluster engine with 2 expert workers x 4 experts; each prompt sent as "
            "`/v1/completions` with `echo: true, logprobs: 0, max_tokens: 1`:\n\n"
            + table(["experts", "perplexity", "vs fp32"], rows) + "\n\n" + "\n".join(f"- {d}" for d in derived))
    write_section("quant_served", "Quantized experts: perplexity through the served API", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
