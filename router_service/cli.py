"""The ``moe-cluster`` command: init-demo, generate, serve.

Every user error (bad path, bad config, bad flag) ends as one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from router_service.arg_types import non_negative_float, non_negative_int, positive_int
from router_service.engine_flags import add_engine_flags

if TYPE_CHECKING:  # the CLI imports torch-heavy modules only when a command needs them
    from cluster.engine.client import EngineClient
    from cluster.engine.sampling import SamplingParams

EXIT_USAGE = 2
EXIT_ERROR = 1


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")




def version() -> str:
    """The installed distribution's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("moe-cluster")
    except PackageNotFoundError:
        return "unknown (not installed)"


def serve_config_defaults() -> dict[str, Any]:
    """What ``serve`` takes from the bundled Serve config when no flag says otherwise (for --help)."""
    from router_service.serve_config import DEFAULT_CONFIG, load_serve_config

    try:
        args: dict[str, Any] = load_serve_config(DEFAULT_CONFIG)["applications"][0].get("args") or {}
    except (ValueError, KeyError, IndexError, TypeError):
        return {}
    return args




def build_parser() -> argparse.ArgumentParser:
    """Every option's help says what it does and its default (``%(default)s`` where argparse holds it)."""
    parser = OneLineParser(prog="moe-cluster", description="Expert-parallel Mixtral serving on Ray.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                        help="print the installed version and exit")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="level of moe-cluster's own log messages on stderr (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    demo = sub.add_parser("init-demo", help="write a demo checkpoint: the trained one, or --random (no network)",
                          description="Write a demo checkpoint (Mixtral architecture, Hugging Face format). By "
                                      "default the trained demo shipped with the package: 17.4M parameters, 8 experts "
                                      "top-2, trained on the King James Bible; it writes English. With --random (or "
                                      "--router-skew) a random-weight model of the same format instead, made from a "
                                      "seed: its text is gibberish; tests and load-balancing experiments use it.")
    demo.add_argument("directory", help="where to write it (created if missing)")
    demo.add_argument("--random", action="store_true",
                      help="write the random-weight demo instead of copying the trained one (default: trained)")
    demo.add_argument("--seed", type=int, help="with --random: seed of the random weights (default: 0)")
    demo.add_argument("--shards", type=positive_int,
                      help="with --random: number of safetensors shards (default: 3; the trained demo has 5)")
    demo.add_argument("--force", action="store_true", help="overwrite an existing checkpoint (default: refuse)")
    demo.add_argument("--router-skew", type=non_negative_float, metavar="Z",
                      help="random demo only (implies --random): make each layer's router prefer its own group of "
                           "adjacent experts, raising their "
                           "logits by about Z standard deviations of the random ones; 0 writes the plain demo. "
                           "Measured on short prompts with contiguous placement, 4 workers x 2 experts, the "
                           "load imbalance (each layer's most loaded worker's rows over the mean worker's, summed "
                           "over layers) is 1.3 at Z=0, 1.65 at 1, "
                           "2.3 at 2, 2.8 at 3, 3.3 at 4, 3.9 at 8 (8 workers x 1: 1.5, 1.8, 2.4, 3.0, 3.4, 4.0; "
                           "more in docs/observability.md) (default: none)")

    gen = sub.add_parser("generate", help="generate a completion for one prompt",
                         description="Generate a completion for one prompt: in this process (--model) or by "
                                     "asking a running server (--grpc).")
    gen.add_argument("--model", metavar="DIR|ORG/NAME[@REV]",
                     help="checkpoint directory, or a Hugging Face Hub id (fetched into the Hub cache; HF_TOKEN, "
                          "HF_HUB_OFFLINE apply) for the local and cluster engines (required without --grpc)")
    gen.add_argument("--prompt", required=True, help="the prompt text (required)")
    gen.add_argument("--max-tokens", type=positive_int, default=32,
                     help="most tokens to generate (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature; 0 is greedy (default: %(default)s, greedy)")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="nucleus sampling: keep the most likely tokens up to this probability mass "
                          "(default: %(default)s, all)")
    gen.add_argument("--top-k", type=int, default=-1,
                     help="keep only the K most likely tokens; -1 keeps all (default: %(default)s)")
    gen.add_argument("--seed", type=int,
                     help="seed for reproducible sampling (default: none, a different sample on every run)")
    gen.add_argument("--stop", action="append", default=[],
                     help="stop generating at this string; repeatable (default: none)")
    gen.add_argument("--json", action="store_true",
                     help="print {text, token_ids, finish_reason} as JSON (default: the text only)")
    gen.add_argument("--engine", choices=["local", "cluster"], default="local",
                     help="local: one process; cluster: expert workers as Ray actors (default: %(default)s)")
    gen.add_argument("--experts-per-worker", type=positive_int, default=1,
                     help="with --engine cluster: experts each worker holds (default: %(default)s)")
    gen.add_argument("--address", help="Ray address for --engine cluster (default: a local embedded Ray)")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                     help="weight and compute dtype (default: the checkpoint's)")
    gen.add_argument("--device", default="auto",
                     help="torch device, e.g. cpu or cuda:0; auto picks CUDA when present (default: %(default)s)")
    gen.add_argument("--grpc", metavar="HOST:PORT",
                     help="ask a running server over gRPC instead (default: generate in this process)")
    gen.add_argument("--stream", action="store_true",
                     help="print text as it is generated (default: all at the end)")
    gen.add_argument("--api-key-env", metavar="VAR",
                     help="with --grpc: send the API key held in environment variable VAR (default: no key)")
    _quantize_flags(gen, "not quantized: as the checkpoint stores them")

    quant = sub.add_parser("quantize", help="write a checkpoint with its experts quantized (int8 or int4)",
                           description="Quantize the expert weights of a full-precision checkpoint once, weight-only "
                                       "(int8 per output channel, int4 with group-wise scales), into compressed-"
                                       "tensors' pack-quantized format; attention, routers and embeddings are "
                                       "copied unchanged. `serve`/`generate --model OUT` load it with the experts "
                                       "kept quantized.")
    quant.add_argument("input", help="the full-precision checkpoint directory")
    quant.add_argument("output", help="where to write the quantized one (created if missing)")
    quant.add_argument("--bits", type=int, choices=[8, 4], required=True, help="8 or 4 bits per expert weight")
    quant.add_argument("--group-size", type=positive_int, metavar="G",
                       help="input features per scale (default: one scale per output channel for 8 bits, 64 for 4)")
    quant.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")

    load = sub.add_parser("expert-load", help="draw a running server's expert load (PNG)",
                          description="Read a running server's Prometheus metrics and draw a layer x expert heatmap "
                                      "of routed rows and a bar chart of the rows each expert worker computed.")
    load.add_argument("url", help="the server's metrics endpoint: HOST:PORT or a URL (/metrics is added when the URL "
                                  "has no path; `serve` exports on port 8080 by default)")
    load.add_argument("--out", default="expert-load.png", help="PNG file to write (default: %(default)s)")
    load.add_argument("--window", type=non_negative_float, default=0.0, metavar="SECONDS",
                      help="draw the load over the next SECONDS (a scrape a second) instead of since the server "
                           "started: each worker's share beside its share until then, and the imbalance gauge "
                           "through the window with rebalances marked (default: %(default)s, since start only)")
    load.add_argument("--model", help="only this served model's series (default: all)")

    scale = sub.add_parser("scale-pool", help="grow or shrink a running server's expert pool",
                           description="Resize a running server's expert pool to N expert workers while it serves "
                                       "(POST /scale_expert_pool); prints when the new expert map is committed, how "
                                       "long it took and the map version.")
    scale.add_argument("address", metavar="HOST:PORT", help="the server's HTTP address (or a URL)")
    scale.add_argument("num_workers", metavar="N", type=positive_int, help="the expert workers the pool should have")
    scale.add_argument("--api-key-env", metavar="VAR", help="send the API key held in this environment variable "
                                                            "(default: none, no key sent)")
    scale.add_argument("--json", action="store_true", help="print the server's JSON answer")
    from router_service.plan_command import add_plan_parser

    add_plan_parser(sub)

    # serve: some defaults come from the Serve config (the bundled serve.yaml, or --config FILE).
    cfg = serve_config_defaults()
    bundled = "the bundled router_service/configs/serve.yaml"
    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API and gRPC on Ray Serve",
                           description="Serve the OpenAI-compatible HTTP API and gRPC on Ray Serve. Options "
                                       "without a flag here take their value from the Serve config (--config, "
                                       f"default: {bundled}).")
    serve.add_argument("--model", metavar="DIR|ORG/NAME[@REV]",
                       help="checkpoint directory, or a Hugging Face Hub id (fetched into the Hub cache; HF_TOKEN, "
                            "HF_HUB_OFFLINE apply; served under the id) (default: the config's model; in the "
                            "bundled config the trained demo model, copied to ~/.cache/moe-cluster/demo if missing "
                            "or outdated)")
    serve.add_argument("--address", help="Ray address of an existing cluster (default: start a local embedded Ray)")
    serve.add_argument("--host", default="127.0.0.1", help="address the HTTP API binds (default: %(default)s)")
    serve.add_argument("--http-port", type=int, default=8000,
                       help="port of the HTTP (OpenAI) API (default: %(default)s)")
    serve.add_argument("--grpc-port", type=int, default=9000, help="port of the gRPC API (default: %(default)s)")
    serve.add_argument("--metrics-port", type=int, default=8080,
                       help="Prometheus metrics port of the embedded Ray (default: %(default)s)")
    serve.add_argument("--experts-per-worker", type=positive_int,
                       help="with the cluster engine: experts each worker holds (default: from the config, "
                            f"{(cfg.get('pool_options') or {}).get('experts_per_worker', 1)} in the bundled one)")
    serve.add_argument("--no-auto-shape", dest="auto_shape", action="store_false",
                       help="with the bundled config and no --experts-per-worker: keep its shape (one expert per "
                            "worker) instead of moe-cluster plan's for this machine (default: the plan's, e.g. on a "
                            "2-core CPU one coordinator and two workers of 4 experts)")
    serve.add_argument("--redundant-experts", type=non_negative_int, metavar="R",
                       help="with the cluster engine: extra expert slots across the pool, per layer, for replicas of "
                            "the hottest experts, placed by rebalancing (default: from the config, "
                            f"{(cfg.get('pool_options') or {}).get('redundant_experts', 0)} in the bundled one)")
    serve.add_argument("--rebalance-interval-s", type=non_negative_float, metavar="SECONDS",
                       help="with the cluster engine: every SECONDS, measure the expert load and, if it is uneven "
                            "enough, move experts and replicas between workers while serving; 0 never does "
                            "(default: from the config, "
                            f"{(cfg.get('pool_options') or {}).get('rebalance_interval_s', 0)} in the bundled one)")
    serve.add_argument("--expert-cache-size", type=non_negative_int, metavar="K",
                       help="with the cluster engine: experts per layer each worker keeps in device memory, the rest "
                            "read from the checkpoint (pinned host memory on a GPU) when needed, least recently used "
                            "evicted first; 0 keeps every expert resident (default: from the config, "
                            f"{(cfg.get('pool_options') or {}).get('expert_cache_size', 0)} in the bundled one)")
    serve.add_argument("--expert-prefetch-lookahead", type=int, choices=[0, 1, 2], metavar="LAYERS",
                       help="with --expert-cache-size: guess the experts this many layers ahead (1 or 2) and have "
                            "the workers load them early; 0 turns the prefetch off (default: from the config, "
                            f"{(cfg.get('pool_options') or {}).get('expert_prefetch_lookahead', 1)} in the bundled "
                            "one)")
    serve.add_argument("--num-engines", type=positive_int,
                       help="independent engine replicas behind the API (default: from the config, "
                            f"{cfg.get('num_engines', 1)} in the bundled one)")
    serve.add_argument("--engine-routing", choices=["power_of_two", "prefix_affinity"],
                       help="how requests pick an engine replica: Serve's power-of-two choices, or prefix affinity "
                            "(the replica whose prefix cache likely holds the prompt, Ray Serve's "
                            "PrefixCacheAffinityRouter; with --num-engines > 1) (default: from the config, "
                            f"{cfg.get('engine_routing', 'power_of_two')} in the bundled one)")
    serve.add_argument("--engine", choices=["local", "cluster"],
                       help="local: one process per engine replica; cluster: expert workers as Ray actors "
                            f"(default: from the config, {cfg.get('engine', 'cluster')} in the bundled one)")
    serve.add_argument("--drain-timeout", type=non_negative_float, metavar="SECONDS",
                       help="on shutdown, how long running requests may take to finish before they end with a "
                            "retryable 'server is shutting down' error (default: from the config, "
                            f"{cfg.get('drain_timeout_s', 30)} in the bundled one)")
    add_engine_flags(serve, cfg)
    serve.add_argument("--stats-interval", type=non_negative_float, default=10.0, metavar="SECONDS",
                       help="print a line per engine replica every SECONDS while there is traffic: running and "
                            "waiting requests, prompt and generation throughput, KV cache usage; 0 never "
                            "(default: %(default)s)")
    serve.add_argument("--log-requests", action="store_true",
                       help="print one line per finished or refused request (default: off)")
    serve.add_argument("--chat-template", metavar="FILE",
                       help="the chat template (Jinja) to use instead of the model's (default: chat_template.jinja "
                            "beside the tokenizer, else tokenizer_config.json's; none: chat completions get a 400)")
    serve.add_argument("--config", metavar="FILE",
                       help=f"a Serve config file (YAML, `serve deploy` format) to deploy (default: {bundled})")
    key = serve.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require this bearer token (HTTP) / metadata key (gRPC) (default: no key)")
    key.add_argument("--api-key-env", metavar="VAR",
                     help="as --api-key, the key read from environment variable VAR, kept out of `ps` "
                          "(default: the config's api_key_env; none in the bundled one)")
    _quantize_flags(serve, "from the config's engine_options; none in the bundled one")
    return parser


def _quantize_flags(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--quantize-experts", choices=["int8", "int4"],
                        help="hold the expert weights quantized, weight-only: int8 per output channel or int4 with "
                             f"group-wise scales; attention, routers and embeddings stay as they are (default: "
                             f"{default})")
    parser.add_argument("--quantize-group-size", type=positive_int, metavar="G",
                        help="with --quantize-experts: input features per scale (default: per output channel for "
                             "int8, 64 for int4)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "init-demo":
            return _init_demo(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "expert-load":
            return _expert_load(args)
        if args.command == "quantize":
            return _quantize(args)
        if args.command == "scale-pool":
            from router_service.pool_client import scale_pool_command

            return scale_pool_command(args)
        if args.command == "plan":
            from router_service.plan_command import plan_command

            return plan_command(args)
        from router_service.serve_command import serve_command  # imports Ray Serve only when serving

        return serve_command(args)
    except (ValueError, TypeError, FileNotFoundError, PermissionError) as err:
        print(f"moe-cluster: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a failure of the engine or the cluster: still one line
        from cluster.errors import describe_failure

        print(f"moe-cluster: error: {describe_failure(err)}", file=sys.stderr)
        return EXIT_ERROR


def _init_demo(args: argparse.Namespace) -> int:
    from cluster.model.demo import copy_trained_demo, init_demo

    if args.random or args.router_skew is not None:
        path = init_demo(args.directory, seed=0 if args.seed is None else args.seed,
                         shards=3 if args.shards is None else args.shards, overwrite=args.force,
                         router_skew=args.router_skew or 0.0)
        print(f"random-weight demo checkpoint written to {path}")
        return 0
    for flag, value in (("--seed", args.seed), ("--shards", args.shards)):
        if value is not None:
            raise ValueError(f"{flag} {value} applies to the random demo only: add --random (the trained demo's "
                             "weights and shards are fixed)")
    path = copy_trained_demo(args.directory, overwrite=args.force)
    print(f"trained demo checkpoint (King James Bible) written to {path}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from cluster.model.quant import expert_quantization
    from cluster.model.quantize_checkpoint import quantize_checkpoint

    quant = expert_quantization(f"int{args.bits}", args.group_size)
    assert quant is not None
    path = quantize_checkpoint(args.input, args.output, quant, overwrite=args.force)
    print(f"checkpoint with {quant.name} experts written to {path}")
    return 0


def _expert_load(args: argparse.Namespace) -> int:
    from router_service.expert_load import metrics_url, plot_load, read_load

    url = metrics_url(args.url)
    out = plot_load(read_load(url, args.window, args.model), args.out, url)
    print(f"expert load written to {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from cluster.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    if args.grpc:
        from router_service.client import grpc_generate_command

        return grpc_generate_command(args, params)
    if not args.model:
        raise ValueError("--model DIR is required (or --grpc HOST:PORT to ask a server)")
    from cluster.model.hub import resolve_model

    args.model = resolve_model(args.model)  # a Hugging Face Hub id: its local snapshot
    if not Path(args.model).is_dir():
        raise ValueError(f"model directory {args.model!r} does not exist")
    engine = _make_engine(args)
    try:
        if args.stream:
            asyncio.run(_print_stream(engine, args.prompt, params))
            return 0
        result = engine.generate([args.prompt], params)[0]
    finally:
        engine.shutdown()
    completion = result.completions[0]
    if args.json:
        print(json.dumps({"text": completion.text, "token_ids": completion.token_ids,
                          "finish_reason": completion.finish_reason}))
    else:
        print(completion.text)
    return 0


async def _print_stream(engine: EngineClient, prompt: str, params: SamplingParams) -> None:
    async for out in engine.stream(prompt, params):
        for delta in out.outputs:
            print(delta.text, end="", flush=True)
    print()


def _make_engine(args: argparse.Namespace) -> EngineClient:
    from cluster.engine_config import ClusterConfig, EngineConfig, PoolConfig

    engine_cfg = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                              quantize_experts=args.quantize_experts, quantize_group_size=args.quantize_group_size)
    if args.engine == "local":
        from cluster.engine.loop import EngineLoop

        return EngineLoop.local(engine_cfg)
    from workers.cluster_engine import ClusterEngine

    return ClusterEngine.start(engine_cfg, ClusterConfig(address=args.address),
                               PoolConfig(experts_per_worker=args.experts_per_worker))


if __name__ == "__main__":
    sys.exit(main())
