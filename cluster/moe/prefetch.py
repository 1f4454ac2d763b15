"""Speculative expert prefetch (issue 23): guess the experts the next layers will need, early, and say so.

The guess applies layer l+d's router (its post-attention RMSNorm and its gate) to the residual stream entering
layer l's MoE: the residual changes little from one layer to the next, so layer l+d's router on it picks mostly
the experts that layer l+d will pick (Pre-gated MoE; the speculative loading of mixtral-offloading, arXiv
2312.17238). Each worker is told the guessed experts it hosts (every replica of one), ``lookahead`` layers ahead
(1 or 2), before layer l's own rows are sent, so that its cache loads them while it computes layer l. A wrong
guess costs a load, never correctness: the worker still runs exactly the experts the rows were routed to.

Hints are variable-length control data; they travel as msgpack (``encode_hint``/``decode_hint``), one message
per (worker, layer). Shape legend: T tokens, H hidden, K top-k, E experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import msgpack
import torch
from torch import Tensor

from cluster.model.checkpoint import CoordinatorWeights
from cluster.model.config import ModelConfig
from cluster.model.ops import rms_norm, route
from cluster.moe.expert_map import ExpertMap
from cluster.moe.layer import MoELayer

MAX_LOOKAHEAD = 2


def predict_experts(x: Tensor, norm_weight: Tensor, gate_weight: Tensor, eps: float, top_k: int) -> list[int]:
    """x (T, H), the residual stream entering some layer's MoE; another layer's post-attention norm (H,) and gate
    (E, H) -> the sorted global expert ids that layer's router would pick for these tokens."""
    _, expert_ids = route(rms_norm(x, norm_weight, eps), gate_weight, top_k)  # (T, K)
    return [int(e) for e in torch.unique(expert_ids).tolist()]


def hints_per_worker(expert_map: ExpertMap, layer: int, experts: Sequence[int]) -> list[list[int]]:
    """The guessed experts of ``layer`` each worker hosts (global ids, sorted; every replica is told)."""
    wanted = set(experts)
    return [sorted(wanted.intersection(hosted)) for hosted in expert_map.layers[layer]]


def encode_hint(layer: int, experts: Sequence[int]) -> bytes:
    return msgpack.packb({"layer": layer, "experts": list(experts)})


def decode_hint(payload: bytes) -> tuple[int, list[int]]:
    """-> (layer, global expert ids); a malformed hint is a ValueError naming it."""
    try:
        data = msgpack.unpackb(payload)
        layer, experts = data["layer"], data["experts"]
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as err:
        raise ValueError(f"malformed prefetch hint {payload[:64]!r}: {err}") from None
    if not isinstance(layer, int) or not isinstance(experts, list) or not all(isinstance(e, int) for e in experts):
        raise ValueError(f"malformed prefetch hint {data!r}: expected {{layer: int, experts: [int]}}")
    return layer, experts


class Prefetcher:
    """The coordinator's half: called with each layer's MoE input residual (``MixtralTransformer.on_moe_input``;
    layer -1: the step's embeddings, for layer 0), it sends every worker its hints for the next ``lookahead``
    layers through ``send(worker, layer, experts)``.

    ``guess_per_token`` experts are guessed per token: one more than the model's top-k by default, since the
    residual drifts between layers and the router's third choice is often the next layer's second (on the trained
    demo, one layer ahead: recall 70% at top-2, 82% at top-3; bench/expert_cache.py measures it)."""

    def __init__(self, norms: Sequence[Tensor], gates: Sequence[Tensor], eps: float, guess_per_token: int,
                 lookahead: int, expert_map: Callable[[], ExpertMap],
                 send: Callable[[int, int, list[int]], None]) -> None:
        if not 1 <= lookahead <= MAX_LOOKAHEAD:
            raise ValueError(f"prefetch look-ahead must be 1..{MAX_LOOKAHEAD} layers, got {lookahead}")
        if not 1 <= guess_per_token <= gates[0].shape[0]:
            raise ValueError(f"prefetch guesses per token must be 1..{gates[0].shape[0]}, got {guess_per_token}")
        self.norms, self.gates = list(norms), list(gates)
        self.eps, self.top_k, self.lookahead = eps, guess_per_token, lookahead
        self.expert_map = expert_map
        self.send = send

    def __call__(self, layer: int, x: Tensor) -> None:
        expert_map = self.expert_map()
        for target in range(layer + 1, min(layer + 1 + self.lookahead, len(self.gates))):
            experts = predict_experts(x, self.norms[target], self.gates[target], self.eps, self.top_k)
            for worker, hint in enumerate(hints_per_worker(expert_map, target, experts)):
                if hint:
                    self.send(worker, target, hint)


@runtime_checkable
class HintSink(Protocol):
    """An Experts stage whose workers take hints (cluster/moe/linked_experts.py's LinkedExperts)."""

    @property
    def prefetch_lookahead(self) -> int:
        """Layers ahead to hint (0: the workers have no cache; send nothing)."""
        ...

    def current_map(self) -> ExpertMap: ...

    def send_hint(self, worker: int, layer: int, experts: list[int]) -> None: ...


def prefetcher_for(moe: object, weights: CoordinatorWeights, cfg: ModelConfig) -> Prefetcher | None:
    """The prefetch of an engine whose MoE backend takes hints and asks for them; else None."""
    sink = moe.executor if isinstance(moe, MoELayer) else moe  # the Experts stage takes the hints
    if not isinstance(sink, HintSink) or not sink.prefetch_lookahead:
        return None
    return Prefetcher([lw.moe_norm for lw in weights.layers], [lw.gate for lw in weights.layers], cfg.rms_norm_eps,
                      cfg.experts_per_token + 1, sink.prefetch_lookahead, sink.current_map, sink.send_hint)
