"""--model org/name[@revision]: resolved through huggingface_hub from a Hub-layout cache built here, offline
(HF_HUB_OFFLINE=1: there is no network), by the real CLI in a subprocess (huggingface_hub reads its environment
when imported)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cluster.engine.loop import EngineLoop
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import EngineConfig

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, model_dir: Path, repo: str = "acme/tiny-moe") -> Path:
    """The layout huggingface_hub writes: models--org--name/{blobs, refs/main, snapshots/<commit>/...}."""
    base = root / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (base / "blobs").mkdir()
    for path in model_dir.iterdir():
        if path.is_file():
            shutil.copy(path, snapshot / path.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(COMMIT)
    return snapshot


def run_cli(*argv: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "router_service.cli", "--log-level", "WARNING", *argv],
                          capture_output=True, text=True, env=env, timeout=300)


def test_model_by_hub_id_offline_from_the_cache(demo_dir: Path, tmp_path: Path) -> None:
    snapshot = hub_cache(tmp_path / "hub", demo_dir)
    prompt = "The workers compute"
    want = EngineLoop.local(EngineConfig(model=str(demo_dir), progress=False, num_kv_blocks=64))
    try:
        expected = want.generate([prompt], SamplingParams(max_tokens=6, temperature=0))[0].completions[0].token_ids
    finally:
        want.shutdown()
    done = run_cli("generate", "--model", "acme/tiny-moe", "--prompt", prompt, "--max-tokens", "6", "--json",
                   cache=tmp_path / "hub")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["token_ids"] == expected
    # serve resolves the id (here at a revision) to the snapshot and serves under the id (as vLLM does)
    code = ("from router_service.cli import build_parser; from router_service.serve_config import resolve_config; "
            f"a = resolve_config(build_parser().parse_args(['serve', '--model', 'acme/tiny-moe@{COMMIT}']))"
            "['applications'][0]['args']; print(a['model']); print(a['served_model_name'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(snapshot.resolve()), "acme/tiny-moe"]
    # not in the cache, offline: one line naming the id
    missing = run_cli("generate", "--model", "acme/absent", "--prompt", prompt, cache=tmp_path / "hub")
    assert missing.returncode == 1 and "model 'acme/absent' is not a local directory" in missing.stderr
    assert missing.stderr.count("\n") == 1


def test_a_serve_config_naming_a_hub_id_is_resolved_by_every_process(demo_dir: Path, tmp_path: Path) -> None:
    """A serve.yaml (the file a KubeRay RayService deploys as it is) whose model is a Hub id: the id stays an id in
    the app's arguments and each process that reads the checkpoint (engine replica, expert workers) resolves it in
    its own Hugging Face cache; the app serves under the id and answers as the local engine on the directory."""
    import signal

    import httpx
    import yaml

    from router_service.serve_config import DEFAULT_CONFIG
    from tests.serving.conftest import free_port
    from tests.test_cli_serve import start

    hub_cache(tmp_path / "hub", demo_dir)
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    app_args = config["applications"][0]["args"]
    app_args.pop("served_model_name", None)
    app_args.update(model="acme/tiny-moe", engine="cluster",
                    pool_options=app_args.get("pool_options", {}) | {"experts_per_worker": 8})
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    local = EngineLoop.local(EngineConfig(model=str(demo_dir), progress=False, num_kv_blocks=64))
    try:
        want = local.generate(["The workers"], SamplingParams(max_tokens=6, temperature=0))[0].completions[0].text
    finally:
        local.shutdown()
    http = free_port()
    proc, _ = start("--config", str(path), "--http-port", str(http), "--grpc-port", str(free_port()),
                        "--metrics-port", str(free_port()),
                        env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    try:
        base = f"http://127.0.0.1:{http}"
        assert [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=60).json()["data"]] == ["acme/tiny-moe"]
        r = httpx.post(f"{base}/v1/completions", timeout=120,
                       json={"model": "acme/tiny-moe", "prompt": "The workers", "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
