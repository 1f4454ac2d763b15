"""The moe-cluster command, run as a real subprocess."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import EngineConfig
from router_service.cli import build_parser


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router_service.cli", "--log-level", "ERROR", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_init_demo_then_generate_json_matches_the_engine(tmp_path: Path) -> None:
    model = tmp_path / "demo"
    made = run_cli("init-demo", str(model))
    assert made.returncode == 0, made.stderr
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"} <= {
        p.name for p in model.iterdir()}
    out = run_cli("generate", "--model", str(model), "--prompt", "Once upon a time", "--max-tokens", "9",
                  "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    engine = EngineLoop.local(EngineConfig(model=str(model), progress=False))
    try:
        want = engine.generate(["Once upon a time"], SamplingParams(max_tokens=9, temperature=0))[0].completions[0]
    finally:
        engine.shutdown()
    assert got == {"text": want.text, "token_ids": want.token_ids, "finish_reason": want.finish_reason}
    assert len(got["token_ids"]) <= 9
    streamed = run_cli("generate", "--model", str(model), "--prompt", "Once upon a time", "--max-tokens", "9",
                       "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == want.text + "\n"


def test_transformers_loads_the_demo_checkpoint(demo_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_dir)
    engine = EngineLoop.local(EngineConfig(model=str(demo_dir), progress=False, num_kv_blocks=16))
    try:
        ids = engine.tokenizer.encode("The quick brown fox")
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0]
        assert (engine.score([ids])[0] - expected).abs().max() < 1e-4
    finally:
        engine.shutdown()


@pytest.mark.parametrize(("args", "message"), [
    (("generate", "--model", "/no/such/dir", "--prompt", "x"), "model directory '/no/such/dir' does not exist"),
    (("generate", "--prompt", "x"), "--model DIR is required"),
    (("generate", "--model", ".", "--prompt", "x", "--max-tokens", "0"), "expected an integer >= 1, got 0"),
    (("generate", "--model", ".", "--prompt", "x", "--bogus"), "unrecognized arguments: --bogus"),
    (("frobnicate",), "invalid choice: 'frobnicate'"),
    (("generate", "--grpc", "127.0.0.1:1", "--prompt", "x", "--api-key-env", "NO_SUCH_KEY_VAR"),
     "--api-key-env NO_SUCH_KEY_VAR: that environment variable is not set or empty"),
])
def test_user_errors_are_one_line_and_non_zero(args: tuple[str, ...], message: str) -> None:
    out = run_cli(*args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr


def test_bad_config_and_bad_sampling_value(tmp_path: Path, demo_dir: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in demo_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    raw = json.loads((broken / "config.json").read_text()) | {"num_key_value_heads": 3}
    (broken / "config.json").write_text(json.dumps(raw))
    out = run_cli("generate", "--model", str(broken), "--prompt", "x")
    assert out.returncode == 1 and "num_attention_heads=8 is not divisible by num_key_value_heads=3" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli("generate", "--model", str(demo_dir), "--prompt", "x", "--temperature", "-1")
    assert out.returncode == 1 and out.stderr.strip() == "moe-cluster: error: temperature must be >= 0, got -1.0"


def test_init_demo_refuses_to_overwrite(tmp_path: Path) -> None:
    assert run_cli("init-demo", str(tmp_path / "m")).returncode == 0
    again = run_cli("init-demo", str(tmp_path / "m"))
    assert again.returncode == 1 and "already holds a checkpoint" in again.stderr
    assert run_cli("init-demo", str(tmp_path / "m"), "--force").returncode == 0


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"moe-cluster": parser} | dict(sub.choices)


@pytest.mark.parametrize("command", ["moe-cluster", "init-demo", "generate", "serve", "expert-load", "scale-pool",
                                     "plan"])
def test_every_option_says_what_it_does_and_its_default(command: str) -> None:
    parser = subcommand_parsers()[command]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 10, f"{command} {name} has no help text"
        takes_value = action.option_strings and action.nargs != 0
        if takes_value and not action.required:
            assert "(default:" in action.help or "required" in action.help, f"{command} {name}: no default"
    assert "%(default)" not in text  # every placeholder expanded


def test_serve_help_gives_the_config_defaults() -> None:
    text = " ".join(subcommand_parsers()["serve"].format_help().split())
    assert "(default: from the config, cluster in the bundled one)" in text
    assert "(default: 8000)" in text and "(default: 127.0.0.1)" in text


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    out = run_cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"moe-cluster {version('moe-cluster')}"
