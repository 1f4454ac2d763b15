"""The MoE math: reference MoE == transformers' MixtralSparseMoeBlock; the grouped local path == reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.model.experts import LocalExperts
from cluster.model.ops import route
from cluster.moe.dispatch_plan import plan_dispatch
from cluster.moe.expert_map import ExpertMap
from cluster.moe.layer import InProcessExperts, MoELayer, reference_moe


def hf_block(num_experts: int, top_k: int, hidden: int = 32, inter: int = 48, seed: int = 0):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=num_experts,
                        num_experts_per_tok=top_k)
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    return block


def split_weights(block) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    gate_up, down = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    inter = down.shape[-1]
    return ([g[:inter] for g in gate_up], list(down), [g[inter:] for g in gate_up])


@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (4, 1), (8, 8), (3, 2)])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_reference_moe_matches_transformers(num_experts: int, top_k: int, tokens: int) -> None:
    block = hf_block(num_experts, top_k)
    x = torch.randn(1, tokens, 32)
    with torch.no_grad():
        expected = block(x)[0]
    w1, w2, w3 = split_weights(block)
    ours = reference_moe(x[0], block.gate.weight.detach(), w1, w2, w3, top_k)
    # float32, different summation order: an absolute floor relative to the outputs' magnitude, not a fixed 1e-6
    torch.testing.assert_close(ours, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_grouped_moe_matches_reference(dtype: torch.dtype) -> None:
    block = hf_block(8, 2, seed=3)
    w1, w2, w3 = ([t.to(dtype) for t in ws] for ws in split_weights(block))
    gate = block.gate.weight.detach().to(dtype)
    experts = LocalExperts((tuple(range(8)),),
                           [torch.stack([torch.cat([a, c]) for a, c in zip(w1, w3, strict=True)])], [torch.stack(w2)])
    moe = MoELayer(InProcessExperts(experts, num_experts=8), num_layers=1, num_experts=8, top_k=2)
    x = torch.randn(50, 32).to(dtype)
    expected = reference_moe(x, gate, w1, w2, w3, 2)
    assert torch.equal(moe.collect(moe.dispatch(0, x, gate)), expected)  # same math, same order: bit-identical
    assert sum(moe.stats.counts[0]) == 50 * 2


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(1, 40), top_k=st.integers(1, 4), workers=st.integers(1, 8), seed=st.integers(0, 10**6))
def test_dispatch_plan_groups_rows_by_worker_then_expert(tokens: int, top_k: int, workers: int, seed: int) -> None:
    num_experts = 8
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_experts, generator=gen).tolist()
    expert_map = ExpertMap((tuple(tuple(perm[w::workers]) for w in range(min(workers, num_experts))),), num_experts)
    logits = torch.randn(tokens, num_experts, generator=gen)
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    slots = expert_map.slots(0)
    plan = plan_dispatch(weights, ids, slots)
    # Every (token, slot) assignment appears exactly once, with its own weight.
    assert sorted(plan.row_token.tolist()) == sorted(t for t in range(tokens) for _ in range(top_k))
    assert len(plan.rows_per_slot) == num_experts and sum(plan.rows_per_slot) == tokens * top_k
    start = 0
    for expert, count in zip(slots.slot_expert.tolist(), plan.rows_per_slot, strict=True):
        rows = plan.row_token[start:start + count]
        assert rows.tolist() == sorted(rows.tolist())  # token order kept inside an expert
        for r, token in enumerate(rows.tolist()):
            slot = int((ids[token] == expert).nonzero().item())
            assert plan.row_weight[start + r] == weights[token, slot]
        start += count


def test_expert_map_validation() -> None:
    assert ExpertMap.contiguous(8, 3, num_layers=2).layers == (((0, 1, 2), (3, 4, 5), (6, 7)),) * 2
    assert ExpertMap.contiguous(8, 8, num_layers=1).num_workers == 1
    with pytest.raises(ValueError, match="at least once"):
        ExpertMap((((0, 1), (1, 0)),), 3)
    with pytest.raises(ValueError, match="hosts an expert twice on one worker"):
        ExpertMap((((0, 1, 1), (2,)),), 3)
    with pytest.raises(ValueError, match="layer 1 has 1 workers, layer 0 has 2"):
        ExpertMap((((0,), (1,)), ((0, 1),)), 2)
    with pytest.raises(ValueError, match="experts_per_worker must be an integer in"):
        ExpertMap.contiguous(8, 9, num_layers=1)


def test_route_renormalises_top_k_in_float32() -> None:
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    gate = torch.randn(8, 16, dtype=torch.bfloat16)
    weights, ids = route(x, gate, 2)
    assert weights.dtype == torch.float32 and ids.shape == (5, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    probs = torch.softmax((x @ gate.T).float(), -1)
    assert torch.equal(ids, probs.topk(2, -1).indices)
