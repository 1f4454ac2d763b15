"""Held-out perplexity of the trained demo model on Jonah (tests/data/kjv_jonah.txt), three ways side by side:
through the served OpenAI API, in the local engine, and in ``transformers``. This is the quality yardstick for
every later change to the expert path (caching, quantization, balancing): the served number must not move.

The API is asked the way evaluation harnesses ask it (lm-evaluation-harness's ``local-completions`` model,
``loglikelihood_rolling`` as for wikitext): each document (here a chapter) is tokenized without special tokens
and cut into disjoint rolling windows of at most ``--max-length`` predicted tokens (``rolling_windows``: the
first window is prefixed with <s>, each later one with the token before it); each window is one
``/v1/completions`` request with the token ids as the prompt, ``echo: true``, ``logprobs: 1``, ``max_tokens: 1``,
``temperature: 0``, and the continuation's log-probabilities are read from ``choices[i].logprobs.token_logprobs``
(the prompt's entries after the context; the one generated token is dropped). The local engine answers the same
requests (echo + logprobs), and ``transformers``' MixtralForCausalLM scores the same windows in one forward each.

    python -m bench.perplexity [--model cluster/demo_model] [--engine cluster|local] [--max-length 512]

Writes the "perplexity" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import ROOT, free_port, machine, progress, table, write_section

DEFAULT_MODEL = ROOT / "cluster" / "demo_model"
DEFAULT_TEXT = ROOT / "tests" / "data" / "kjv_jonah.txt"
DICTIONARY = Path("/usr/share/dict/words")  # Debian's wamerican (apt-get install wamerican)
PROMPT_WORDS = 6  # held-out prompts: the first words of each chapter of Jonah
COMPLETION_TOKENS = 32


@dataclass(frozen=True)
class Window:
    """One scoring request: ``tokens`` (context then continuation) and how many leading ones are context."""

    tokens: list[int]
    context_len: int

    @property
    def continuation(self) -> list[int]:
        return self.tokens[self.context_len:]


@dataclass(frozen=True)
class Score:
    """Summed negative log-likelihood (nats) of ``tokens`` predicted tokens of a text of ``num_bytes`` UTF-8 bytes."""

    nll: float
    tokens: int
    num_bytes: int

    @property
    def nats_per_token(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / self.num_bytes / math.log(2)


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> list[Window]:
    """lm-evaluation-harness's ``get_rolling_token_windows`` with ``context_len=1`` and ``make_disjoint_window``:
    every token is predicted exactly once, each window predicts at most ``max_length`` of them, the first from
    ``prefix_token`` and each later one from the token just before it."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    windows: list[Window] = []
    first = min(max_length, len(tokens))
    if first:
        windows.append(Window([prefix_token, *tokens[:first]], 1))
    predicted = first
    while predicted < len(tokens):
        end = min(len(tokens), predicted + max_length)
        windows.append(Window(list(tokens[predicted - 1:end]), 1))
        predicted = end
    return windows


def document_windows(model_dir: Path, documents: Sequence[str], max_length: int) -> list[Window]:
    """Every document tokenized without special tokens (as the harness does) and cut into rolling windows."""
    from cluster.model.config import ModelConfig
    from cluster.model.tokenizer import Tokenizer

    tok, bos = Tokenizer(model_dir), ModelConfig.from_file(model_dir).bos_token_id
    if bos is None:
        raise ValueError(f"{model_dir} has no bos_token_id: the first window of a document needs a prefix token")
    return [w for doc in documents for w in rolling_windows(tok.encode(doc, add_special_tokens=False), bos,
                                                               max_length)]


def read_documents(path: Path, limit_chars: int | None = None) -> list[str]:
    """One document a line (a chapter); ``limit_chars``: only the first that many characters of each (tests)."""
    docs = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [d[:limit_chars] for d in docs] if limit_chars else docs


def total(logprobs: Sequence[Sequence[float]], documents: Sequence[str]) -> Score:
    """Each window's continuation log-probabilities -> the summed score (in float64, in a fixed order)."""
    nll = -math.fsum(lp for window in logprobs for lp in window)
    return Score(nll, sum(len(w) for w in logprobs), sum(len(d.encode()) for d in documents))


# ---- the three scorers: each returns, per window, the continuation tokens' log-probabilities ----------------


def served_logprobs(base_url: str, model: str, windows: Sequence[Window], batch: int = 4,
                    api_key: str | None = None) -> list[list[float]]:
    """Through the OpenAI completions API, as lm-evaluation-harness's local-completions asks it."""
    import httpx

    async def run() -> list[list[float]]:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        async with httpx.AsyncClient(base_url=base_url, timeout=600, headers=headers) as client:
            async def one(group: Sequence[Window]) -> list[list[float]]:
                body = {"model": model, "prompt": [w.tokens for w in group], "max_tokens": 1, "temperature": 0,
                        "logprobs": 1, "echo": True, "seed": 1234}
                response = await client.post("/v1/completions", json=body)
                response.raise_for_status()
                choices = sorted(response.json()["choices"], key=lambda c: c["index"])
                assert len(choices) == len(group), (len(choices), len(group))
                return [[float(x) for x in c["logprobs"]["token_logprobs"][w.context_len:len(w.tokens)]]
                        for c, w in zip(choices, group, strict=True)]

            groups = [windows[i:i + batch] for i in range(0, len(windows), batch)]
            return [lps for part in await asyncio.gather(*(one(g) for g in groups)) for lps in part]

    return asyncio.run(run())


def engine_logprobs(engine: Any, windows: Sequence[Window]) -> list[list[float]]:
    """Through an engine's own API (EngineLoop / ClusterEngine): the same echo + logprobs request."""
    from cluster.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, logprobs=0, echo=True)
    results = engine.generate([w.tokens for w in windows], params)
    out = []
    for result, w in zip(results, windows, strict=True):
        prompt_lps = result.prompt_logprobs
        assert prompt_lps is not None and len(prompt_lps) == len(w.tokens)
        out.append([lp.logprob for lp in prompt_lps[w.context_len:]])
    return out


def transformers_logprobs(model: Any, windows: Sequence[Window]) -> list[list[float]]:
    """``transformers``' MixtralForCausalLM (float32): one forward per window, log-softmax of the next token."""
    out = []
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w.tokens])
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (L, V)
            targets = ids[0, w.context_len:]
            out.append(logp[w.context_len - 1:-1].gather(1, targets[:, None])[:, 0].tolist())
    return out


def load_transformers(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# ---- greedy completions of held-out prompts, and how many of their words are English --------------------------


def held_out_prompts(documents: Sequence[str]) -> list[str]:
    return [" ".join(doc.split()[:PROMPT_WORDS]) for doc in documents]


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", text)


def dictionary_fraction(texts: Sequence[str], dictionary: set[str]) -> tuple[int, int]:
    """(words found in ``dictionary`` (case-insensitive; a possessive's stem counts), all words)."""
    found = all_words = 0
    for text in texts:
        for word in words(text):
            all_words += 1
            found += word.lower() in dictionary or word.lower().removesuffix("'s") in dictionary
    return found, all_words


def load_dictionary(path: Path = DICTIONARY) -> set[str]:
    if not path.is_file():
        raise FileNotFoundError(f"no word list at {path}: apt-get install wamerican (Debian's American English list)")
    return {line.strip().lower() for line in path.read_text(errors="replace").splitlines() if line.strip()}


def served_completions(base_url: str, model: str, prompts: Sequence[str]) -> list[str]:
    import httpx

    texts = []
    for prompt in prompts:
        response = httpx.post(f"{base_url}/v1/completions", timeout=600, json={
            "model": model, "prompt": prompt, "max_tokens": COMPLETION_TOKENS, "temperature": 0})
        response.raise_for_status()
        texts.append(response.json()["choices"][0]["text"])
    return texts


# ---- the benchmark -------------------------------------------------------------------------------------------


def serve_app(model_dir: Path, engine: str, max_model_len: int) -> str:
    """Start a local Ray with the Serve app on ``model_dir``; returns its HTTP base URL."""
    import ray
    from ray import serve

    from router_service.app import build_app

    port = free_port()
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": str(model_dir), "served_model_name": "ppl", "engine": engine,
                         "engine_options": {"max_model_len": max_model_len, "kv_cache_gib": 0.25},
                         "pool_options": {"experts_per_worker": 4, "threads_per_worker": 1}}),
              name="ppl", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--max-length", type=int, default=512, help="most predicted tokens per window")
    parser.add_argument("--engine", choices=["cluster", "local"], default="cluster", help="the served engine")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    progress(f"load average before: {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}")
    docs = read_documents(args.text)
    windows = document_windows(args.model, docs, args.max_length)
    progress(f"{len(docs)} documents, {len(windows)} windows, {sum(len(w.continuation) for w in windows)} tokens")

    from cluster.engine.loop import EngineLoop
    from cluster.engine_config import EngineConfig

    timings: dict[str, float] = {}
    scores: dict[str, Score] = {}
    t0 = time.perf_counter()
    scores["transformers"] = total(transformers_logprobs(load_transformers(args.model), windows), docs)
    timings["transformers"] = time.perf_counter() - t0
    progress(f"transformers: {scores['transformers'].perplexity:.4f}")
    local = EngineLoop.local(EngineConfig(model=str(args.model), progress=False,
                                          max_model_len=args.max_length + 2, kv_cache_gib=0.25))
    try:
        t0 = time.perf_counter()
        scores["local engine"] = total(engine_logprobs(local, windows), docs)
        timings["local engine"] = time.perf_counter() - t0
    finally:
        local.shutdown()
    progress(f"local engine: {scores['local engine'].perplexity:.4f}")
    import ray
    from ray import serve

    try:
        base = serve_app(args.model, args.engine, args.max_length + 2)
        t0 = time.perf_counter()
        served_name = f"served ({args.engine} engine, HTTP)"
        scores[served_name] = total(served_logprobs(base, "ppl", windows), docs)
        timings[served_name] = time.perf_counter() - t0
        prompts = held_out_prompts(docs)
        completions = served_completions(base, "ppl", prompts)
    finally:
        if ray.is_initialized():  # (Ray may have failed to start: then there is nothing to stop)
            serve.shutdown()
            ray.shutdown()
    progress(f"served: {scores[served_name].perplexity:.4f}")
    load_after = os.getloadavg()
    progress(f"load average after: {load_after[0]:.1f} {load_after[1]:.1f} {load_after[2]:.1f}")

    reference = scores["transformers"]
    rows = [[name, s.tokens, f"{s.nats_per_token:.6f}", f"{s.perplexity:.4f}", f"{s.bits_per_byte:.4f}",
             f"{abs(s.nll - reference.nll) / reference.nll:.1e}", f"{timings[name]:.1f}"]
            for name, s in scores.items()]
    dictionary = load_dictionary()
    found, n_words = dictionary_fraction(completions, dictionary)
    ref_found, ref_words = dictionary_fraction(docs, dictionary)
    examples = [f"| {p} | {c.strip()} |" for p, c in zip(prompts, completions, strict=True)]
    worst = max(abs(s.nll - reference.nll) / reference.nll for s in scores.values())
    rel_path = args.model.resolve().relative_to(ROOT) if args.model.resolve().is_relative_to(ROOT) else args.model
    body = "\n".join([
        f"Held-out text: `{args.text.relative_to(ROOT) if args.text.is_relative_to(ROOT) else args.text}` (the book "
        f"of Jonah, {len(docs)} chapters, {reference.num_bytes:,} bytes; never seen in training), model "
        f"`{rel_path}` (float32 compute). Windows as lm-evaluation-harness's `loglikelihood_rolling`: each chapter "
        f"tokenized without special tokens, disjoint windows of at most {args.max_length} predicted tokens "
        f"({len(windows)} windows); the served API asked as its `local-completions` does (`echo`, `logprobs: 1`, "
        "`max_tokens: 1`, token-id prompts). Perplexity = exp(nats/token); bits/byte over the chapters' UTF-8 bytes.",
        "",
        table(["scored by", "tokens", "nats/token", "perplexity", "bits/byte",
               "relative NLL difference vs transformers", "seconds"], rows),
        "",
        f"- held-out perplexity (Jonah): {reference.perplexity:.4f}; served, local engine and transformers agree "
        f"to {worst:.1e} relative",
        "",
        f"Machine: {machine()}. Load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (this 2-core "
        "machine is shared with other jobs: the seconds are not a speed measurement). The trainer's own test loss "
        "(4.0951 nats/token, cluster/demo_model/training.json) is over 512-token windows of the chapters joined "
        "with <s> and </s> and counts those tokens too, so it differs slightly from this harness-style number.",
        "",
        f"Command: `python -m bench.perplexity --engine {args.engine} --max-length {args.max_length}`",
        "",
        f"Greedy completions ({COMPLETION_TOKENS} tokens, `temperature: 0`) of held-out prompts (the first "
        f"{PROMPT_WORDS} words of each chapter of Jonah) through the same served API:",
        "",
        "| prompt | completion |",
        "|---|---|",
        *examples,
        "",
        f"- served greedy completions of held-out prompts: {found} of {n_words} words "
        f"({100 * found / n_words:.1f}%) are in Debian's `wamerican` word list (the held-out text itself: "
        f"{100 * ref_found / ref_words:.1f}%: names such as Tarshish and archaic forms such as 'hast' are not in "
        "the list)",
    ])
    print(body)
    if not args.no_write:
        write_section("perplexity", "Held-out perplexity (trained demo model)", body)


if __name__ == "__main__":
    main()
