"""``moe-cluster serve``'s engine flags, with vLLM's names and meanings: prefix caching, sizing (context length,
batch limits, dtype, KV cache memory) and the served model name. Each lands in the Serve config's application
args (``engine_options``, ``served_model_name``), so a flag and the config file say the same thing."""

from __future__ import annotations

import argparse
from typing import Any

from router_service.arg_types import bounded, positive_float, positive_int

# flag destination -> EngineConfig field (engine_options key)
ENGINE_FLAGS = {"max_model_len": "max_model_len", "max_num_seqs": "max_num_seqs",
                "max_num_batched_tokens": "max_num_batched_tokens", "dtype": "dtype",
                "kv_cache_gib": "kv_cache_gib", "kv_cache_fraction": "kv_cache_fraction",
                "enable_prefix_caching": "enable_prefix_caching"}


def add_engine_flags(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """The flags; ``defaults`` are the bundled config's application args (for --help)."""
    options = defaults.get("engine_options") or {}

    def default(name: str, fallback: Any) -> str:
        return f"default: from the config, {options.get(name, fallback)} in the bundled one"

    group = parser.add_argument_group("engine", "vLLM's flags, same meaning; each sets the config's engine_options")
    group.add_argument("--served-model-name", metavar="NAME",
                       help="the model name clients pass as 'model' (default: the config's served_model_name, or "
                            "the --model directory's name)")
    group.add_argument("--max-model-len", type=positive_int, metavar="TOKENS",
                       help="context length: prompt plus generated tokens (default: the model's "
                            "max_position_embeddings). The KV cache must hold one such sequence, or serve refuses "
                            "to start")
    group.add_argument("--max-num-seqs", type=positive_int, metavar="N",
                       help=f"sequences in one forward step ({default('max_num_seqs', 64)})")
    group.add_argument("--max-num-batched-tokens", type=positive_int, metavar="TOKENS",
                       help="tokens in one forward step; longer prompts are prefilled in chunks "
                            f"({default('max_num_batched_tokens', 1024)})")
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="weights and KV cache dtype (default: the checkpoint's)")
    memory = group.add_mutually_exclusive_group()
    memory.add_argument("--kv-cache-gib", type=positive_float, metavar="GIB",
                        help=f"KV cache memory per engine replica, in GiB ({default('kv_cache_gib', None)})")
    memory.add_argument("--kv-cache-fraction", type=bounded(float, above=0, at_most=0.95), metavar="F",
                        help="instead of --kv-cache-gib: this fraction of the device's free memory once the weights "
                             "are loaded (on a GPU, what vLLM's --gpu-memory-utilization sizes, but of free "
                             "memory, KV cache only) (default: 0.25 when no GiB are set)")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                       help="reuse the KV cache of a prompt prefix computed before (system prompts, few-shot "
                            "examples, chat histories); --no-enable-prefix-caching turns it off (default: on)")


def apply_engine_flags(args: argparse.Namespace, app_args: dict[str, Any]) -> None:
    """Set the flags given on the command line into the application args."""
    if getattr(args, "served_model_name", None):
        app_args["served_model_name"] = args.served_model_name
    options = app_args.get("engine_options") or {}
    for dest, field in ENGINE_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            options[field] = value
    if getattr(args, "kv_cache_fraction", None) is not None:
        options.pop("kv_cache_gib", None)  # the fraction was asked for: the config's GiB must not win
    app_args["engine_options"] = options
