"""Automatic prefix caching on vs off, side by side in one run, on two workloads:

  * shared system prompt: N requests (default 64) whose prompts start with one long system prompt (at least 3/4
    of each prompt), then a question of their own; all arrive at once;
  * multi-turn chat replay, shaped like vLLM's multi-turn benchmark (benchmarks/multi_turn: a prefix common to
    all conversations, a prefix of each conversation's own, then turns of a user message and an answer), scaled
    to the bench model's 2048-token context: C conversations of T turns; the common prefix is the system prompt,
    each conversation adds a document of its own (``--conversation-prefix-len``), and a turn's prompt is the whole
    history so far (earlier messages and answers) plus a new user message, sent when the previous answer is back.
    Conversations join one after another (each when the previous one's first answer is back), as users of a
    chat service do; the lockstep variant starts them all at once, so every turn of all of them arrives in one
    step (the worst case for TTFT: one big prefill step that every request waits for).

    python -m bench.prefix_cache [--size bench] [--requests 64] [--system-len 384] [--question-len 96]
                                 [--conversations 8] [--turns 6] [--conversation-prefix-len 128] [--repeats 2]

Each peer is a fresh local engine (empty cache) with the same weights and limits; the repeats alternate off / on,
so a drifting (shared) machine slows both alike; medians are reported. TTFT is the engine's (arrival to first
token); throughput is output tokens over the workload's wall time. Greedy outputs of both peers are compared.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.common import command_line, load_average, machine, progress, table, write_section
from bench.models import bench_model, describe
from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import RequestResult
from cluster.engine_config import EngineConfig


@dataclass
class Run:
    ttfts: list[float]
    wall: float
    output_tokens: int
    prompt_tokens: int
    hits: int
    queries: int
    outputs: list[list[int]]


def engine(model: str, caching: bool, args: argparse.Namespace) -> EngineLoop:
    return EngineLoop.local(EngineConfig(model=model, progress=False, enable_prefix_caching=caching,
                                         max_num_seqs=64, max_num_batched_tokens=args.batched_tokens,
                                         kv_cache_gib=1.0, max_model_len=2048))


def finish(eng: EngineLoop, results: list[RequestResult], wall: float) -> Run:
    stats = eng.stats()
    eng.shutdown()
    ttfts = [r.metrics.ttft for r in results if r.metrics is not None and r.metrics.ttft is not None]
    return Run(ttfts, wall, sum(len(r.completions[0].token_ids) for r in results),
               sum(len(r.prompt_token_ids) for r in results), stats.prefix_cache_hits_total,
               stats.prefix_cache_queries_total, [r.completions[0].token_ids for r in results])


def shared_system_prompt(model: str, caching: bool, args: argparse.Namespace, vocab: int) -> Run:
    rng = random.Random(0)
    system = [rng.randrange(3, vocab) for _ in range(args.system_len)]
    prompts = [system + [rng.randrange(3, vocab) for _ in range(args.question_len)] for _ in range(args.requests)]
    eng = engine(model, caching, args)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    results = eng.generate(prompts, params)
    return finish(eng, results, time.perf_counter() - started)


def chat_replay(model: str, caching: bool, args: argparse.Namespace, vocab: int, lockstep: bool = False) -> Run:
    rng = random.Random(1)
    system = [rng.randrange(3, vocab) for _ in range(args.system_len)]
    documents = [[rng.randrange(3, vocab) for _ in range(args.conversation_prefix_len)]
                 for _ in range(args.conversations)]
    messages = [[[rng.randrange(3, vocab) for _ in range(args.question_len)] for _ in range(args.turns)]
                for _ in range(args.conversations)]
    eng = engine(model, caching, args)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    results: list[list[RequestResult]] = [[] for _ in messages]
    joined = [threading.Event() for _ in messages]  # set when conversation c's first answer is back

    def converse(c: int) -> None:
        if c > 0 and not lockstep:
            joined[c - 1].wait()
        history = system + documents[c]
        for message in messages[c]:
            history += message
            result = eng.generate([history], params)[0]
            results[c].append(result)
            joined[c].set()
            history += result.completions[0].token_ids

    started = time.perf_counter()
    threads = [threading.Thread(target=converse, args=(c,)) for c in range(len(messages))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return finish(eng, [r for conv in results for r in conv], time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--system-len", type=int, default=384)
    parser.add_argument("--question-len", type=int, default=96)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--conversation-prefix-len", type=int, default=128,
                        help="chat replay: tokens of a document of its own per conversation")
    parser.add_argument("--batched-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    assert args.system_len >= 3 * args.question_len, "the system prompt must be at least 3/4 of each prompt"
    model = str(bench_model(args.size))
    from cluster.model.config import ModelConfig

    vocab = ModelConfig.from_file(model).vocab_size
    load_before = load_average()
    progress(f"load average before (1/5/15 min): {load_before}")
    workloads: dict[str, Callable[[str, bool, argparse.Namespace, int], Run]] = {
        "shared system prompt": shared_system_prompt, "multi-turn chat replay": chat_replay,
        "chat replay, lockstep": functools.partial(chat_replay, lockstep=True)}
    runs: dict[tuple[str, bool], list[Run]] = {}
    for repeat in range(args.repeats):
        for name, workload in workloads.items():
            for caching in (False, True):
                progress(f"repeat {repeat + 1}/{args.repeats}: {name}, prefix caching {'on' if caching else 'off'}")
                run = workload(model, caching, args, vocab)
                runs.setdefault((name, caching), []).append(run)
                progress(f"  mean TTFT {statistics.mean(run.ttfts) * 1e3:.0f} ms, wall {run.wall:.1f} s, "
                         f"hits {run.hits}/{run.queries} tokens")
    load_after = load_average()
    quiet = float(load_before.split(" / ")[0]) <= 1.0
    progress(f"load average after: {load_after}")

    def median(name: str, caching: bool, value: str) -> float:
        return statistics.median(getattr_value(r, value) for r in runs[(name, caching)])

    rows, derived = [], []
    for name in workloads:
        for caching in (False, True):
            rs = runs[(name, caching)]
            rows.append([name, "on" if caching else "off", len(rs[0].ttfts), rs[0].prompt_tokens,
                         median(name, caching, "ttft_mean") * 1e3, median(name, caching, "ttft_p50") * 1e3,
                         median(name, caching, "tput"), f"{100 * rs[-1].hits / max(1, rs[-1].queries):.0f}%"])
        same = all(r.outputs == runs[(name, False)][0].outputs for r in runs[(name, True)])
        ttft_ratio = median(name, True, "ttft_mean") / median(name, False, "ttft_mean")
        tput_ratio = median(name, True, "tput") / median(name, False, "tput")
        derived.append(f"- {name}: caching on has {ttft_ratio:.2f}x the mean TTFT of off (target <= 0.33) and "
                       f"{tput_ratio:.2f}x its throughput (target >= 1.5); greedy outputs "
                       f"{'equal' if same else 'DIFFER'}")
    headers = ["workload", "prefix caching", "requests", "prompt tokens", "mean TTFT (ms)", "median TTFT (ms)",
               "output tokens/s", "cache hits (tokens)"]
    command = command_line("bench.prefix_cache", args)
    body = "\n".join([
        f"Machine: {machine()}. Model {describe(args.size)}. Command: `{command}`.",
        f"Load average (1/5/15 min) before {load_before}, after {load_after}: "
        + ("a quiet machine (1-minute load at most 1 before; the load after counts this run's own threads); "
           if quiet else
           "the machine was shared with other work during this run, so absolute numbers are noisy; ")
        + ("with one repeat, the peers of a workload ran one after the other (off, then on), so a change of load "
           "between them moves the ratios too." if args.repeats == 1 else
           "the ratios are of medians of peers run alternately."),
        f"Shared system prompt: {args.requests} requests, a {args.system_len}-token system prompt + "
        f"{args.question_len} tokens each, {args.output_len} output tokens, all at once. Chat replay: "
        f"{args.conversations} conversations x {args.turns} turns, the {args.system_len}-token system prompt, a "
        f"{args.conversation_prefix_len}-token document per conversation, {args.question_len}-token user messages, "
        f"{args.output_len}-token answers; conversations join one after another (each when the previous one's "
        "first answer is back), or all start at once (lockstep: every turn of all of them then arrives in the same "
        f"step). Each peer a fresh local engine (max_num_batched_tokens {args.batched_tokens}); medians of "
        f"{args.repeats} alternating repeats.",
        "", table(headers, rows), "", *derived])
    print(body)
    if not args.no_write:
        write_section("prefix_cache", "Automatic prefix caching: on vs off", body)


def getattr_value(run: Run, value: str) -> float:
    if value == "ttft_mean":
        return statistics.mean(run.ttfts)
    if value == "ttft_p50":
        return statistics.median(run.ttfts)
    assert value == "tput"
    return run.output_tokens / run.wall


if __name__ == "__main__":
    main()
