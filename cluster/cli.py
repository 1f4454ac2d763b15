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
from typing import Any, NoReturn

EXIT_USAGE = 2
EXIT_ERROR = 1


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="moe-cluster", description="Expert-parallel Mixtral serving on Ray.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    demo = sub.add_parser("init-demo", help="write the small demo checkpoint (no network needed)")
    demo.add_argument("directory")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--shards", type=_positive_int, default=3)
    demo.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")

    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    gen.add_argument("--model", help="checkpoint directory (local and cluster engines)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=_positive_int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--json", action="store_true", help="print {text, token_ids, finish_reason}")
    gen.add_argument("--engine", choices=["local", "cluster"], default="local")
    gen.add_argument("--experts-per-worker", type=_positive_int, default=1)
    gen.add_argument("--address", help="Ray address for --engine cluster (default: a local embedded Ray)")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--device", default="auto")
    gen.add_argument("--grpc", metavar="HOST:PORT", help="ask a running server over gRPC instead")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--api-key-env", metavar="VAR", help="with --grpc: send the API key in environment variable VAR")

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API and gRPC on Ray Serve")
    serve.add_argument("--model", help="checkpoint directory (default: the demo model, created if missing)")
    serve.add_argument("--address", help="Ray address (default: start a local embedded Ray)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=9000)
    serve.add_argument("--metrics-port", type=int, default=8080, help="Prometheus port of the embedded Ray")
    serve.add_argument("--experts-per-worker", type=_positive_int)
    serve.add_argument("--num-engines", type=_positive_int)
    serve.add_argument("--engine", choices=["local", "cluster"])
    serve.add_argument("--config", help="a Serve config file (YAML) to deploy instead of the defaults")
    key = serve.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require this bearer token (HTTP) / metadata key (gRPC)")
    key.add_argument("--api-key-env", metavar="VAR",
                     help="as --api-key, the key read from environment variable VAR (kept out of `ps`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "init-demo":
            return _init_demo(args)
        if args.command == "generate":
            return _generate(args)
        from router_service.cli import serve_command  # imports Ray Serve only when serving

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
    from cluster.demo import init_demo

    path = init_demo(args.directory, seed=args.seed, shards=args.shards, overwrite=args.force)
    print(f"demo checkpoint written to {path}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from cluster.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    if args.grpc:
        from router_service.client import grpc_generate_command

        return grpc_generate_command(args, params)
    if not args.model:
        raise ValueError("--model DIR is required (or --grpc HOST:PORT to ask a server)")
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


async def _print_stream(engine: Any, prompt: str, params: Any) -> None:
    async for out in engine.stream(prompt, params):
        for delta in out.outputs:
            print(delta.text, end="", flush=True)
    print()


def _make_engine(args: argparse.Namespace) -> Any:
    from cluster.engine_config import ClusterConfig, EngineConfig

    engine_cfg = EngineConfig(model=args.model, dtype=args.dtype, device=args.device)
    if args.engine == "local":
        from cluster.engine_loop import LocalEngine

        return LocalEngine.from_config(engine_cfg)
    from cluster.cluster_engine import ClusterEngine

    return ClusterEngine.start(engine_cfg, ClusterConfig(experts_per_worker=args.experts_per_worker,
                                                         address=args.address))


if __name__ == "__main__":
    sys.exit(main())
