"""The skewed demo checkpoint (``init-demo --router-skew Z``): Z = 0 is the plain demo, byte for byte; at the
documented Z, transformers' own router logits load the most loaded worker of a contiguous placement at least twice
the mean; and the local engine still routes and generates exactly as transformers does."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cluster.engine.loop import LocalEngine
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import EngineConfig
from cluster.model.config import ModelConfig
from cluster.model.demo import CORPUS, demo_config, hot_experts, init_demo, skew_routers
from cluster.moe.eplb import imbalance, worker_rows
from cluster.moe.expert_map import ExpertMap
from tests.conftest import HFCheckpoint
from tests.test_cli import run_cli
from tests.test_parity_hf import hf_greedy

SKEW = 3.0  # the Z that the CLI help and docs/observability.md give for "the most loaded worker >= 2x the mean"
EXPERTS_PER_WORKER = 2  # 8 experts on 4 workers, contiguous: worker w hosts experts 2w and 2w + 1
PROMPTS = [line for line in CORPUS.splitlines() if line.strip()][:8]  # ordinary text, 20-30 tokens each


@pytest.fixture(scope="module")
def skewed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("skewed") / "model"
    made = run_cli("init-demo", str(path), "--router-skew", str(SKEW))
    assert made.returncode == 0, made.stderr
    return path


@pytest.fixture(scope="module")
def skewed_hf(skewed_dir: Path) -> HFCheckpoint:
    from transformers import AutoModelForCausalLM

    return HFCheckpoint(skewed_dir, AutoModelForCausalLM.from_pretrained(skewed_dir).eval(), {})


def transformers_routed_rows(model: torch.nn.Module, prompts: list[list[int]], top_k: int) -> list[list[int]]:
    """[layer][expert] rows that transformers' routers send (top-k of its router logits), over every prompt."""
    counts: list[torch.Tensor] = []
    with torch.no_grad():
        for ids in prompts:
            logits = model(torch.tensor([ids]), output_router_logits=True).router_logits  # [layer] (T, E)
            for layer, layer_logits in enumerate(logits):
                rows = torch.bincount(layer_logits.topk(top_k, dim=-1).indices.reshape(-1),
                                      minlength=layer_logits.shape[-1])
                if layer == len(counts):
                    counts.append(rows)
                else:
                    counts[layer] += rows
    return [row.tolist() for row in counts]


def test_zero_skew_is_the_plain_demo(demo_dir: Path, tmp_path: Path) -> None:
    plain = init_demo(tmp_path / "zero", router_skew=0.0)
    files = sorted(p.name for p in demo_dir.iterdir())
    assert files == sorted(p.name for p in plain.iterdir()) and "model.safetensors.index.json" in files
    for name in files:
        assert (plain / name).read_bytes() == (demo_dir / name).read_bytes(), name


def test_skew_changes_only_what_it_says(skewed_dir: Path, demo_dir: Path) -> None:
    """Each matrix changes by rank one (what it reads or writes along one direction); the norms not at all."""
    from safetensors.torch import load_file

    plain = {k: v for f in sorted(demo_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    skewed = {k: v for f in sorted(skewed_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert plain.keys() == skewed.keys()
    changed = sorted(k for k in plain if not torch.equal(plain[k], skewed[k]))
    assert changed == sorted(k for k in plain if plain[k].ndim == 2)  # the norms stay ones
    for name in changed:
        # Rank one up to the float32 rounding of the stored skewed weights: singular values in float64, the
        # second one against a tolerance relative to the magnitudes (an absolute one fails by machine).
        delta = skewed[name].double() - plain[name].double()
        singular = torch.linalg.svdvals(delta)
        scale = max(singular[0].item(), torch.linalg.matrix_norm(skewed[name].double(), ord=2).item())
        rounding = max(delta.shape) * torch.finfo(torch.float32).eps * scale
        assert singular[0].item() > 1e3 * rounding, name  # a real change, far above the rounding
        assert singular[1].item() <= rounding, (name, singular[:2].tolist(), rounding)


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_a_bad_skew_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match=f"router_skew must be a number >= 0, got {bad}"):
        skew_routers({}, demo_config(300), bad, seed=0)
    refused = run_cli("init-demo", "/nonexistent/never-written", "--router-skew", str(bad))
    assert refused.returncode != 0 and "--router-skew: expected a number >= 0" in refused.stderr


def test_skewed_routers_load_one_worker_of_a_contiguous_placement(skewed_dir: Path, skewed_hf: HFCheckpoint,
                                                                  demo_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig.from_file(skewed_dir)
    placements = ExpertMap.contiguous(cfg.num_experts, EXPERTS_PER_WORKER, cfg.num_layers).layers
    engine = LocalEngine.from_config(EngineConfig(model=str(skewed_dir), progress=False, num_kv_blocks=64))
    try:
        prompts = [engine.tokenizer.encode(text) for text in PROMPTS]
        engine.score(prompts)  # a prefill of each prompt, as transformers runs them
        assert engine.stats().tokens_per_expert == transformers_routed_rows(skewed_hf.model, prompts,
                                                                            cfg.experts_per_token)
    finally:
        engine.shutdown()
    skewed = transformers_routed_rows(skewed_hf.model, prompts, cfg.experts_per_token)
    plain = transformers_routed_rows(AutoModelForCausalLM.from_pretrained(demo_dir).eval(), prompts,
                                     cfg.experts_per_token)
    skewed_workers = [worker_rows(p, loads) for p, loads in zip(placements, skewed, strict=True)]
    plain_workers = [worker_rows(p, loads) for p, loads in zip(placements, plain, strict=True)]
    assert imbalance(skewed_workers) >= 2.0 > imbalance(plain_workers)
    for layer, hot in enumerate(hot_experts(cfg, seed=0)):  # each layer's hot group, on one worker, is the busiest
        busiest = max(range(len(placements[layer])), key=lambda w: skewed_workers[layer][w])
        assert set(placements[layer][busiest]) == set(hot)
    assert len({tuple(hot) for hot in hot_experts(cfg, seed=0)}) == cfg.num_layers  # a different group per layer


def test_skewed_model_generates_what_transformers_does(skewed_dir: Path, skewed_hf: HFCheckpoint) -> None:
    engine = LocalEngine.from_config(EngineConfig(model=str(skewed_dir), progress=False, num_kv_blocks=64))
    try:
        for text in PROMPTS[:2]:
            ids = engine.tokenizer.encode(text)
            with torch.no_grad():
                expected = skewed_hf.model(torch.tensor([ids])).logits[0]
            assert (engine.score([ids])[0] - expected).abs().max().item() <= 1e-4
            result = engine.generate([ids], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
            assert result.completions[0].token_ids == hf_greedy(skewed_hf, ids, 24)
    finally:
        engine.shutdown()
