"""The expert weights one process holds (a coordinator running its experts locally, or an expert worker), and
running them on rows already grouped by expert.

Shape legend (see ops.py): R_w rows this process computes, H hidden, I expert intermediate, n_local experts held
in a layer (local ids 0..n_local-1; ``layer_experts`` maps them to global ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from cluster.model.ops import expert_swiglu, grouped_expert_swiglu
from cluster.model.quant import QuantizedWeight, weight_nbytes
from cluster.model.quant_kernels import layer_kernels, run_experts_with_kernels


class GroupedExperts(Protocol):
    """Expert weights one process runs rows on (what the Experts stage of cluster/moe/layer.py and an expert
    worker call): ``LocalExperts`` below, or anything holding the same experts otherwise (a cache of them)."""

    layer_experts: tuple[tuple[int, ...], ...]  # [layer][local id] -> global expert id

    def n_local_experts(self, layer: int) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def run_grouped(self, layer: int, rows: Tensor, rows_per_local_expert: Tensor) -> Tensor:
        """rows (R_w, H) grouped by local expert, rows_per_local_expert (n_local,) -> outputs (R_w, H)."""
        ...


@dataclass
class LocalExperts:
    """Weights of the experts one process holds, stacked per layer in local-id order.

    layer_experts[layer]: global ids of the layer's local experts (index = local id);
    w13[layer]: (n_local, 2I, H) with w1 and w3 fused; w2[layer]: (n_local, H, I). Either plain tensors in the
    compute dtype or QuantizedWeight stacks (cluster/model/quant.py), dequantized per call - only the experts that have
    rows - to the dtype of the rows; on a GPU, through torch's int8/int4/FP8 kernels where one fits
    (cluster/model/quant_kernels.py; ``use_kernels`` False: dequantize there too, for comparisons).
    """

    layer_experts: tuple[tuple[int, ...], ...]
    w13: list[Tensor | QuantizedWeight]
    w2: list[Tensor | QuantizedWeight]
    use_kernels: bool = True
    # per layer: int4 weights packed for torch's int4 kernel, made at first use (a copy beside the held integers)
    kernel_cache: dict[int, dict[Any, Any]] = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a worker's export through Ray's object store) without the kernels' packed copies, which the
        receiver rebuilds at first use."""
        return {**self.__dict__, "kernel_cache": {}}

    def n_local_experts(self, layer: int) -> int:
        return len(self.layer_experts[layer])

    @property
    def nbytes(self) -> int:
        """Resident bytes of the expert weights (integers and scales when quantized)."""
        return sum(weight_nbytes(w) for w in (*self.w13, *self.w2))

    @property
    def quantization(self) -> str | None:
        """'int8' / 'int4-g64' ... when the experts are held quantized, else None."""
        held = [w for w in (*self.w13, *self.w2) if isinstance(w, QuantizedWeight) and w.data.shape[0]]
        if not held:
            return None
        groups = {w.group_size for w in held if w.group_size != w.in_features}
        return ("fp8" if held[0].is_fp8 else f"int{held[0].bits}") + (f"-g{max(groups)}" if groups else "")

    def run_grouped(self, layer: int, rows: Tensor, rows_per_local_expert: Tensor) -> Tensor:
        """rows (R_w, H) grouped by local expert, rows_per_local_expert (n_local,) -> outputs (R_w, H)."""
        w13, w2, counts = self.w13[layer], self.w2[layer], rows_per_local_expert
        if isinstance(w13, QuantizedWeight) or isinstance(w2, QuantizedWeight):
            kernels = layer_kernels(w13, w2, rows) if self.use_kernels and rows.is_cuda else None
            if kernels is not None:  # a GPU kernel multiplies the held weights as they are
                return run_experts_with_kernels(rows, w13, w2, counts.tolist(), kernels,
                                                self.kernel_cache.setdefault(layer, {}))
            # Dequantize only the experts that have rows (a decode step touches few), to the rows' dtype.
            active = torch.nonzero(counts.cpu() > 0).flatten()  # (n_active,) local ids with rows
            counts = counts[active.to(counts.device)]
            w13 = _dense(w13, active, rows.dtype)  # (n_active, 2I, H)
            w2 = _dense(w2, active, rows.dtype)  # (n_active, H, I)
        assert isinstance(w13, Tensor) and isinstance(w2, Tensor)
        if grouped_mm_supported(rows):
            offsets = counts.cumsum(0).to(device=rows.device, dtype=torch.int32)
            return grouped_expert_swiglu(rows, w13, w2, offsets)
        out = torch.empty_like(rows)
        start = 0
        for local_id, count in enumerate(counts.tolist()):
            if count:
                end = start + count
                out[start:end] = expert_swiglu(rows[start:end], w13[local_id], w2[local_id])
                start = end
        return out


def _dense(w: Tensor | QuantizedWeight, local_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``local_ids`` experts of a stack as plain tensors in ``dtype``."""
    if isinstance(w, QuantizedWeight):
        return w[local_ids.to(w.data.device)].dequantize(dtype)
    return w[local_ids.to(w.device)]


def grouped_mm_supported(x: Tensor) -> bool:
    """torch's grouped matmul: on CPUs for every dtype; on CUDA for bfloat16 on Hopper and newer."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
