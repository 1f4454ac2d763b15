"""Sizing at start-up: serve's engine flags land in the Serve config; a KV cache that cannot hold one
max_model_len sequence is refused at start (serve before anything starts, the engine once loaded) with the
numbers and the flags that fix it; the shipped configs fit."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.engine.loader import build_local_engine, engine_dtype
from cluster.engine_config import EngineConfig
from cluster.model.config import ModelConfig
from cluster.model.kv_cache import kv_bytes_per_block
from k8s.render import overlays, serve_config
from router_service.cli import build_parser
from router_service.serve_config import DEFAULT_CONFIG, check_kv_budget, load_serve_config, resolve_config


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_engine_flags_set_the_config_engine_options(demo_dir: Path) -> None:
    config = resolve_config(serve_args("--model", str(demo_dir), "--max-model-len", "1024", "--max-num-seqs", "8",
                                       "--max-num-batched-tokens", "256", "--dtype", "bfloat16", "--kv-cache-gib",
                                       "0.5", "--served-model-name", "mine", "--no-enable-prefix-caching"))
    args = config["applications"][0]["args"]
    assert args["served_model_name"] == "mine"
    assert args["engine_options"] | {} == {"max_num_seqs": 8, "max_num_batched_tokens": 256, "kv_cache_gib": 0.5,
                                           "enable_prefix_caching": False, "max_model_len": 1024, "dtype": "bfloat16"}
    fraction = resolve_config(serve_args("--model", str(demo_dir), "--kv-cache-fraction", "0.1"))
    options = fraction["applications"][0]["args"]["engine_options"]
    assert options["kv_cache_fraction"] == 0.1 and "kv_cache_gib" not in options  # the config's GiB yield
    assert resolve_config(serve_args("--model", str(demo_dir)))["applications"][0]["args"]["engine_options"][
        "enable_prefix_caching"] is True  # on by default


def test_a_kv_cache_smaller_than_one_sequence_is_refused_naming_numbers_and_flags(demo_dir: Path) -> None:
    model_cfg = ModelConfig.from_file(str(demo_dir))
    cfg = EngineConfig(model=str(demo_dir), progress=False, max_model_len=2048)
    per_token = kv_bytes_per_block(model_cfg, 16, engine_dtype(model_cfg, cfg)) // 16
    gib = 1000 * per_token / 2**30  # room for 1000 tokens: fewer than 2048
    args = {"model": str(demo_dir), "engine_options": {"max_model_len": 2048, "kv_cache_gib": gib}}
    with pytest.raises(ValueError) as refused:
        check_kv_budget(args)
    message = str(refused.value)
    for part in ("max_model_len=2048", "992 tokens", "--max-model-len to at most 992", "--kv-cache-gib",
                 "--kv-cache-fraction"):
        assert part in message, message
    with pytest.raises(ValueError, match="cannot hold one sequence of max_model_len=2048"):
        build_local_engine(cfg.with_(kv_cache_gib=gib))  # the engine refuses too
    check_kv_budget(args | {"engine_options": {"max_model_len": 992, "kv_cache_gib": gib}})  # what it says fits
    engine = build_local_engine(cfg.with_(kv_cache_gib=gib, max_model_len=992))
    assert engine.kv.num_blocks * engine.block_size >= 992


def test_serve_refuses_at_start_with_the_numbers(demo_dir: Path) -> None:
    """A real `moe-cluster serve`: refused in about a second, before Ray or any port."""
    done = subprocess.run([sys.executable, "-m", "router_service.cli", "serve", "--model", str(demo_dir),
                           "--max-model-len", "2048", "--kv-cache-gib", "0.0005"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "cannot hold one sequence of max_model_len=2048 tokens" in done.stderr
    errors = [line for line in done.stderr.splitlines() if " INFO " not in line]  # (the plan's shape line is INFO)
    assert len(errors) == 1 and "Lower --max-model-len to at most" in errors[0]


MIXTRAL_8X7B = ('{"architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096, '
                '"intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, '
                '"num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, '
                '"max_position_embeddings": 32768, "rope_theta": 1e6, "torch_dtype": "bfloat16"}')


@pytest.mark.parametrize("overlay", [None, *overlays()], ids=lambda o: "bundled" if o is None else o.name)
def test_shipped_configs_hold_one_max_model_len_sequence(overlay: Path | None, demo_dir: Path,
                                                          tmp_path: Path) -> None:
    """The bundled config with the demo model (what `serve` runs without flags: a chat request's default
    max_tokens is the whole context, so it must fit); each Kubernetes overlay with its model's shape."""
    config = load_serve_config(DEFAULT_CONFIG) if overlay is None else serve_config(overlay)
    args = config["applications"][0]["args"]
    model = demo_dir
    if "mixtral" in str(args["model"]).lower():
        model = tmp_path / "mixtral"
        model.mkdir()
        (model / "config.json").write_text(MIXTRAL_8X7B)
    check_kv_budget({"model": str(model), "engine_options": args.get("engine_options") or {}})
