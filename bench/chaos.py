"""Chaos soak: steady mixed load over HTTP and gRPC against ``moe-cluster serve --num-engines 2`` on loopback, while
a random expert worker or engine replica is SIGKILLed (by pid) every ~30 s. Every greedy and seeded request is
checked token for token against its no-fault result, taken from the same server before the first kill.

    python -m bench.chaos [--duration-s 300] [--kill-every-s 30] [--concurrency 6] [--no-write]

Reports requests sent, completed, resumed (the ingress's moe_cluster_requests_resumed_total), failed, outputs
different from the reference, kills, and the engine replicas and expert workers that replaced the killed ones;
writes its table into docs/reliability.md. Before each kill it waits until the app is back at full strength (two
engine replicas, every expert worker), so each kill leaves a live replica to resume on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import free_port, machine, progress, table

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
KINDS = ("http-stream", "http-unary", "chat-stream", "grpc-stream", "grpc-unary")
ENGINE, WORKER = "EngineDeployment", "ExpertWorker"  # in the process titles Ray gives the actors' processes


@dataclass(frozen=True)
class Spec:
    """One request of the catalogue; greedy or seeded ones are checked against their no-fault result."""

    kind: str
    prompt: str
    max_tokens: int
    temperature: float
    seed: int | None

    @property
    def checked(self) -> bool:
        return self.temperature == 0 or self.seed is not None


def catalogue(count: int, rng: random.Random) -> list[Spec]:
    """``count`` requests: each kind in turn, a third greedy, a third seeded sampled, a third unseeded sampled."""
    specs = []
    for i in range(count):
        sampling = i % 3
        specs.append(Spec(KINDS[i % len(KINDS)], f"Request {i}: the experts of one layer", rng.randint(32, 96),
                          0.0 if sampling == 0 else 0.8, 1000 + i if sampling == 1 else None))
    return specs


async def http_call(client: Any, base: str, model: str, spec: Spec) -> Any:
    """The outcome of ``spec`` over HTTP, reduced to what must equal the reference (ValueError: a failure)."""
    body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens, "temperature": spec.temperature,
                            "ignore_eos": True}
    if spec.seed is not None:
        body["seed"] = spec.seed
    chat = spec.kind == "chat-stream"
    body |= {"messages": [{"role": "user", "content": spec.prompt}]} if chat else {"prompt": spec.prompt}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if spec.kind == "http-unary":
        r = await client.post(f"{base}{path}", json=body | {"n": 2, "logprobs": 1})
        if r.status_code != 200:
            raise ValueError(f"HTTP {r.status_code}: {r.text[:200]}")
        data = r.json()
        return (data["usage"]["completion_tokens"],
                [(c["text"], c["finish_reason"], c["logprobs"]["tokens"]) for c in data["choices"]])
    texts, finish, usage = [], None, None
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{base}{path}", json=body) as r:
        if r.status_code != 200:
            raise ValueError(f"HTTP {r.status_code}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise ValueError(f"error event: {event['error']['message'][:200]}")
            for choice in event["choices"]:
                texts.append(choice["delta"].get("content", "") if chat else choice["text"])
                finish = choice["finish_reason"] or finish
            usage = event.get("usage") or usage
    if usage is None:
        raise ValueError("the stream ended without its usage event")
    return usage["completion_tokens"], "".join(texts), finish


async def grpc_call(stub: Any, model: str, spec: Spec) -> Any:
    import grpc

    from router_service.client import build_request

    request = build_request(model, spec.prompt, max_new_tokens=spec.max_tokens, temperature=spec.temperature,
                            seed=spec.seed, ignore_eos=True)
    try:
        if spec.kind == "grpc-unary":
            response = await stub.Generate(request, timeout=180)
            return response.usage.completion_tokens, list(response.token_ids), response.text
        tokens, text, usage = [], "", 0
        async for message in stub.GenerateStream(request, timeout=180):
            tokens += message.token_ids
            text += message.text
            usage = message.usage.completion_tokens or usage
        return usage, tokens, text
    except grpc.aio.AioRpcError as err:
        raise ValueError(f"gRPC {err.code().name}: {err.details()}") from None


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    checked: int = 0
    different: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    kills: list[tuple[float, str, int, float]] = field(default_factory=list)  # (at s, what, pid, back to full in s)
    first: dict[str, set[int]] = field(default_factory=dict)  # the processes of each kind at the start
    seen: dict[str, set[int]] = field(default_factory=dict)  # ... and every one seen since

    def look(self, root: int) -> None:
        for what in (ENGINE, WORKER):
            now = actors(root, what)
            self.first.setdefault(what, now)
            self.seen.setdefault(what, set()).update(now)

    def replaced(self, what: str) -> int:
        return len(self.seen[what] - self.first[what])


def descendants(root: int) -> dict[int, str]:
    """Every process under ``root`` (from /proc), with its command line (Ray's process title for actors)."""
    children: dict[int, list[int]] = {}
    titles: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            titles[int(entry)] = title.decode(errors="replace")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = titles.get(child, "")
            todo.append(child)
    return found


def actors(root: int, what: str) -> set[int]:
    marker = f"ServeReplica:moe-cluster:{ENGINE}" if what == ENGINE else f"ray::{WORKER}"
    return {pid for pid, title in descendants(root).items() if marker in title}


def resumed_total(metrics_url: str) -> float:
    import httpx

    try:
        lines = httpx.get(metrics_url, timeout=10).text.splitlines()
    except httpx.HTTPError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("ray_moe_cluster_requests_resumed_total{"))


async def full_strength(root: int, workers: int, timeout_s: float = 300) -> float:
    """Seconds until the processes of two engine replicas and ``workers`` expert workers are up."""
    started = time.monotonic()
    while len(actors(root, ENGINE)) < 2 or len(actors(root, WORKER)) < workers:
        if time.monotonic() - started > timeout_s:
            raise SystemExit("the app did not come back to full strength within 300 s")
        await asyncio.sleep(1)
    return time.monotonic() - started


async def soak(args: argparse.Namespace, root: int, http: str, grpc_target: str, metrics: str) -> Tally:
    import grpc
    import httpx

    from protos.moe_cluster.v1 import generation_pb2_grpc as pb_grpc

    rng = random.Random(args.seed)
    specs = catalogue(args.catalogue, rng)
    model, tally = "moe-cluster-demo", Tally()
    async with httpx.AsyncClient(timeout=180) as client, grpc.aio.insecure_channel(grpc_target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)

        async def call(spec: Spec) -> Any:
            if spec.kind.startswith("grpc"):
                return await grpc_call(stub, model, spec)
            return await http_call(client, http, model, spec)

        progress(f"no-fault reference of {len(specs)} requests")
        reference: list[Any] = []
        for start in range(0, len(specs), args.concurrency):
            reference += await asyncio.gather(*(call(s) for s in specs[start:start + args.concurrency]))
        workers = len(actors(root, WORKER))
        tally.look(root)
        stop_at = time.monotonic() + args.duration_s
        began = time.monotonic()

        async def client_loop(c: int) -> None:
            local = random.Random(args.seed * 1000 + c)
            while time.monotonic() < stop_at:
                i = local.randrange(len(specs))
                tally.sent += 1
                try:
                    got = await call(specs[i])
                except Exception as err:  # an HTTP status, an error event, a gRPC status, a cut connection
                    tally.failures[str(err)[:120]] += 1
                    progress(f"FAILED {specs[i].kind}: {err}")
                    continue
                tally.completed += 1
                if specs[i].checked:
                    tally.checked += 1
                    if got != reference[i]:
                        tally.different += 1
                        progress(f"DIFFERENT {specs[i]}")
                elif got[0] != specs[i].max_tokens * (2 if specs[i].kind == "http-unary" else 1):
                    tally.different += 1
                    progress(f"WRONG LENGTH {specs[i]}: {got[0]}")

        async def killer() -> None:
            while True:
                await asyncio.sleep(args.kill_every_s * rng.uniform(0.8, 1.2))
                if time.monotonic() > stop_at - 10:
                    return
                await full_strength(root, workers)
                what = rng.choice([ENGINE, WORKER])
                pid = rng.choice(sorted(actors(root, what)))
                os.kill(pid, signal.SIGKILL)
                at = time.monotonic() - began
                await asyncio.sleep(2)
                back = await full_strength(root, workers) + 2
                tally.look(root)
                tally.kills.append((at, what, pid, back))
                progress(f"t={at:.0f}s killed {what} pid {pid}; full strength again after {back:.0f} s; "
                         f"{tally.completed}/{tally.sent} completed, {sum(tally.failures.values())} failed")

        kills = asyncio.create_task(killer())
        await asyncio.gather(*(client_loop(c) for c in range(args.concurrency)))
        kills.cancel()
    return tally


def start_server(args: argparse.Namespace, http_port: int, grpc_port: int, metrics_port: int) -> subprocess.Popen[str]:
    cmd = [str(Path(sys.executable).parent / "moe-cluster"), "serve", "--num-engines", "2", "--experts-per-worker",
           str(args.experts_per_worker), "--http-port", str(http_port), "--grpc-port", str(grpc_port),
           "--metrics-port", str(metrics_port)]
    progress(" ".join(cmd[1:]))
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout is not None
    for line in server.stdout:  # the log until it says it is ready
        if "moe-cluster ready" in line:
            return server
    raise SystemExit(f"moe-cluster serve exited ({server.wait()}) before it was ready")


def write_doc(body: str) -> None:
    """Replace (or append) the chaos section of docs/reliability.md."""
    start, end = "<!-- bench:chaos:start -->", "<!-- bench:chaos:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = DOC.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)
    progress(f"wrote the chaos section of {DOC}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=300.0, help="length of the soak (default: %(default)s)")
    parser.add_argument("--kill-every-s", type=float, default=30.0, help="mean time between kills")
    parser.add_argument("--concurrency", type=int, default=6, help="clients sending back to back")
    parser.add_argument("--catalogue", type=int, default=30, help="distinct requests, reference taken once each")
    parser.add_argument("--experts-per-worker", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    server = start_server(args, http_port, grpc_port, metrics_port)
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        tally = asyncio.run(soak(args, server.pid, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}",
                                 metrics))
        time.sleep(15)  # Ray exports metrics every few seconds
        resumed = resumed_total(metrics)
        tally.look(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    killed = Counter(what for _, what, _, _ in tally.kills)
    failed = sum(tally.failures.values())
    command = (f"python -m bench.chaos --duration-s {args.duration_s:g} --kill-every-s {args.kill_every_s:g} "
               f"--concurrency {args.concurrency}")
    rows = [[f"{args.duration_s:g} s", tally.sent, tally.completed, int(resumed), failed, tally.checked,
             tally.different, killed[ENGINE], killed[WORKER], tally.replaced(ENGINE), tally.replaced(WORKER)]]
    kills = table(["t (s)", "killed", "back to full strength (s)"],
                  [[f"{at:.0f}", what, f"{back:.0f}"] for at, what, _, back in tally.kills])
    body = "\n".join([
        "### Chaos soak (measured)", "",
        f"Machine: {machine()}. Demo model; `moe-cluster serve --num-engines 2 --experts-per-worker "
        f"{args.experts_per_worker}` (two engine replicas on one pool of {8 // args.experts_per_worker} expert "
        f"workers), clients on loopback: {args.concurrency} clients back to back, each request one of "
        f"{args.catalogue} (HTTP completions streamed and unary with n=2 and logprobs, chat streamed, gRPC streamed "
        "and unary; a third greedy, a third seeded, a third unseeded sampled; 32-96 tokens). Every greedy or seeded "
        "request is compared token for token with its no-fault result; unseeded ones must have their full length. "
        f"Command: `{command}`.", "",
        table(["duration", "sent", "completed", "resumed", "failed", "checked", "different",
               "engine replicas killed", "expert workers killed", "engine replicas replaced",
               "expert workers replaced"], rows), "",
        "Replaced: processes of that kind that appeared after the start (Serve starts a new engine replica for "
        "one killed, the pool a new expert worker). Kills, each once the app was back at full strength:", "", kills])
    if tally.failures:
        body += "\n\nFailures: " + "; ".join(f"{n} x {msg}" for msg, n in tally.failures.most_common())
    print(body)
    if not args.no_write:
        write_doc(body)


if __name__ == "__main__":
    main()
