"""Quantized experts through torch's kernels (cluster/model/quant_kernels.py): FP8 experts kept in FP8 stand for the
same weights as FP8 dequantized at load; on a CPU every layer takes the dequantize path; on a GPU (tests marked
`gpu`) each kernel - int8pack, int4pack, scaled_mm - agrees with the CPU dequantize path, relative to the output's
magnitude, and the engine with kernels agrees with the CPU engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from cluster.model.checkpoint import Checkpoint, load_expert_weights
from cluster.model.config import ModelConfig
from cluster.model.experts import LocalExperts
from cluster.model.quant import ExpertQuantization, QuantizedWeight, cat_rows, fp8_weight, quantize_weight
from cluster.model.quant_kernels import (
    FP8_MAX,
    choose_kernel,
    dequantize_linear,
    kernel_candidates,
    kernel_problem,
    layer_kernels,
    quantized_linear,
    run_experts_with_kernels,
)
from cluster.moe.layer import InProcessExperts, MoELayer
from tests.conftest import HFCheckpoint
from tests.test_parity_hf import prompt_ids
from tests.test_quant import engine, fp8_checkpoint

DEMO = Path(__file__).resolve().parent.parent / "cluster" / "demo_model"


def grouped_rows(counts: list[int], hidden: int, dtype: torch.dtype, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(sum(counts), hidden, generator=gen).to(dtype)


def relative_error(got: Tensor, want: Tensor) -> float:
    """Largest abs difference, relative to the largest abs value of ``want`` (compared in float64)."""
    got, want = got.double().cpu(), want.double().cpu()
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)


@pytest.mark.parametrize("scheme", ["channel", "tensor", "block"])
def test_fp8_experts_kept_in_fp8_mean_the_weights_dequantized_at_load(hf_small: HFCheckpoint, tmp_path: Path,
                                                                       scheme: str) -> None:
    fp8_checkpoint(hf_small, tmp_path / "fp8", scheme)
    ckpt = Checkpoint(tmp_path / "fp8")
    cfg = ModelConfig.from_file(tmp_path / "fp8" / "config.json")
    names = [f"model.layers.1.block_sparse_moe.experts.3.{p}.weight" for p in ("w1", "w3", "w2")]
    i, h = cfg.intermediate_size, cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = dict(zip(names, [(i, h), (i, h), (h, i)], strict=True))
    kept = ckpt.load_weights(shapes, torch.float32, "cpu", "t", progress=False, keep_quantized=True, keep_fp8=True)
    dequantized = ckpt.load(shapes, torch.float32, "cpu", "t", progress=False)
    for name in names:
        w = kept[name]
        assert isinstance(w, QuantizedWeight) and w.is_fp8 and w.data.dtype == torch.float8_e4m3fn
        assert torch.equal(w.dequantize(torch.float32), dequantized[name])
        assert w.nbytes < dequantized[name].numel() * 4 / 3  # one byte a weight plus small scales
    # w1 and w3 with different per-tensor scales still fuse into w13
    w13 = cat_rows(kept[names[0]], kept[names[1]])
    assert isinstance(w13, QuantizedWeight)
    assert torch.equal(w13.dequantize(torch.float32), torch.cat([dequantized[names[0]], dequantized[names[1]]]))
    assert w13.name == ("fp8-g16" if scheme == "block" else "fp8")


def test_fp8_weight_refuses_a_scale_that_fits_no_scheme() -> None:
    with pytest.raises(ValueError, match=r"FP8 scale of shape \[3, 3\]"):
        fp8_weight(torch.zeros(8, 8, dtype=torch.float8_e4m3fn), torch.ones(3, 3), (4, 4))


def test_on_a_cpu_every_expert_matrix_takes_the_dequantize_path() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 64, 128, generator=gen)
    x = torch.randn(3, 128)
    for quant in (ExpertQuantization(8), ExpertQuantization(4, 64)):
        held = quantize_weight(w, quant)
        assert kernel_candidates(held[0], x) == () and choose_kernel(held[0], x) is None
        assert layer_kernels(held, held, x) is None
        assert torch.equal(quantized_linear(x, held[1], {}, "k", None), dequantize_linear(x, held[1]))


@pytest.mark.parametrize("quant", [ExpertQuantization(8), ExpertQuantization(4, 32)], ids=["int8", "int4-g32"])
def test_the_per_expert_loop_equals_the_grouped_layer(quant: ExpertQuantization) -> None:
    """run_experts_with_kernels (the GPU kernels' loop, here with every kernel None) computes what run_grouped does."""
    gen = torch.Generator().manual_seed(2)
    w13 = quantize_weight(torch.randn(4, 96, 64, generator=gen) * 0.1, quant)
    w2 = quantize_weight(torch.randn(4, 64, 48, generator=gen) * 0.1, quant)
    counts = [3, 0, 5, 1]
    rows = grouped_rows(counts, 64, torch.float32, seed=3)
    experts = LocalExperts(((0, 1, 2, 3),), [w13], [w2])
    want = experts.run_grouped(0, rows, torch.tensor(counts))
    got = run_experts_with_kernels(rows, w13, w2, counts, (None, None), {})
    assert relative_error(got, want) <= 1e-5


def test_a_packed_copy_is_made_again_when_the_weights_change_in_place() -> None:
    """The kernels' cache (int4 packing, FP8 block scales) never serves a stale copy: an expert overwritten in place
    (say, an expert cache refilling a slot) is packed again; unchanged weights are packed once."""
    from cluster.model.quant_kernels import _cached

    stack = quantize_weight(torch.randn(2, 64, 128), ExpertQuantization(4, 64))
    made: list[Tensor] = []

    def make(w: QuantizedWeight) -> Tensor:
        made.append(w.data.clone())
        return made[-1]

    cache: dict[object, object] = {}
    first = _cached(cache, ("w13", 1), stack[1], make)
    assert _cached(cache, ("w13", 1), stack[1], make) is first and len(made) == 1
    stack.data[1].copy_(stack.data[0])  # new values, same storage
    again = _cached(cache, ("w13", 1), stack[1], make)
    assert len(made) == 2 and torch.equal(again, stack.data[0])


def test_kernel_calls_fit_torchs_own_shape_and_dtype_checks() -> None:
    """Without a GPU the kernels cannot run, but torch's meta functions check what they are given (shapes, dtypes,
    strides, scale layouts): run each call on fake tensors (FakeTensorMode) at demo-like shapes and 1 and 32 rows."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cluster.model.quant_kernels import (
        fp8_block_scales,
        int4pack_linear,
        pack_for_int4mm,
        scaled_mm_block_linear,
        scaled_mm_linear,
    )

    gen = torch.Generator().manual_seed(9)
    n, k = 1024, 512
    int4 = quantize_weight(torch.randn(n, k, generator=gen), ExpertQuantization(4, 64))
    fp8 = _held("fp8", torch.randn(n, k, generator=gen))
    fp8_block = _held("fp8-block", torch.randn(n, k, generator=gen))
    block_scales = fp8_block_scales(fp8_block)
    assert block_scales is not None and fp8_block_scales(fp8) is None  # per channel: no 128-row blocks
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        def fake(w: QuantizedWeight) -> QuantizedWeight:
            return QuantizedWeight(mode.from_tensor(w.data), mode.from_tensor(w.scale), w.bits, w.group_size, k)

        packed = pack_for_int4mm(fake(int4))
        assert packed.scale_and_zeros.shape == (k // 64, n, 2)
        for rows in (1, 32):
            x = mode.from_tensor(torch.randn(rows, k, dtype=torch.bfloat16))
            assert int4pack_linear(x, packed).shape == (rows, n)
            for rowwise in (True, False):
                out = scaled_mm_linear(x, fake(fp8), rowwise)
                assert out.shape == (rows, n) and out.dtype == torch.bfloat16
            if hasattr(torch.nn.functional, "ScalingType"):  # the blockwise recipes (torch >= 2.10)
                out = scaled_mm_block_linear(x, fake(fp8_block), mode.from_tensor(block_scales))
                assert out.shape == (rows, n) and out.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ on a GPU


def _held(kind: str, w: Tensor) -> QuantizedWeight:
    if kind == "int8":
        return quantize_weight(w, ExpertQuantization(8))
    if kind == "int4":
        return quantize_weight(w, ExpertQuantization(4, 64))
    if kind == "fp8-block":  # [128, 128] blocks, transformers' fp8 format as DeepSeek-style checkpoints write it
        n, k = w.shape
        blocks = w.abs().reshape(n // 128, 128, k // 128, 128).amax(dim=(1, 3)) / FP8_MAX
        full = blocks.repeat_interleave(128, 0).repeat_interleave(128, 1)
        return fp8_weight((w / full).to(torch.float8_e4m3fn), blocks, (128, 128))
    scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
    return fp8_weight((w / scale).to(torch.float8_e4m3fn), scale)


# Relative to the output's magnitude: the rows' own bf16 rounding for the integer kernels; FP8 rows (3 mantissa bits)
# for scaled_mm.
KERNEL_TOLERANCE = {"int8": 2e-2, "int4": 2e-2, "fp8": 8e-2, "fp8-block": 8e-2}
EXPECTED_KERNEL = {"int8": ("int8pack",), "int4": ("int4pack",), "fp8": ("scaled_mm_rowwise", "scaled_mm_tensorwise"),
                   "fp8-block": ("scaled_mm_block",)}
NEEDS = {"int8": (8, 0), "int4": (8, 0), "fp8": (8, 9), "fp8-block": (9, 0)}


def require_kernel(kind: str, device: str) -> None:
    """No kernel was chosen: fail where one gave wrong numbers, skip (saying why) where torch lacks them here."""
    problems = {c: kernel_problem(c, device, torch.bfloat16) for c in EXPECTED_KERNEL[kind]}
    capability = torch.cuda.get_device_capability()
    if capability < NEEDS[kind] or (kind == "fp8-block" and capability != (9, 0)):
        pytest.skip(f"{kind}: compute capability {torch.cuda.get_device_capability()} has no such kernel")
    assert not any(p and "differs" in p for p in problems.values()), problems
    pytest.skip(f"no {kind} kernel in this torch build on this GPU: {problems}")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 32])
@pytest.mark.parametrize("kind", ["int8", "int4", "fp8", "fp8-block"])
def test_each_kernel_agrees_with_the_cpu_dequantize_path(kind: str, rows: int) -> None:
    """Mixtral-like proportions (w13 of the demo: 1024 x 256; w2: 256 x 512), bf16 rows on the GPU."""
    gen = torch.Generator().manual_seed(5)
    for n, k in ((1024, 256), (256, 512)):
        w = _held(kind, torch.randn(n, k, generator=gen) * 0.05)
        x = torch.randn(rows, k, generator=gen)
        want = dequantize_linear(x, w)  # CPU, float32
        x_gpu, w_gpu = x.to("cuda", torch.bfloat16), w.to("cuda")
        kernel = choose_kernel(w_gpu, x_gpu)
        if kernel is None:
            require_kernel(kind, str(x_gpu.device))
        assert kernel in EXPECTED_KERNEL[kind]
        got = quantized_linear(x_gpu, w_gpu, {}, "k", kernel)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        err = relative_error(got, want)
        assert err <= KERNEL_TOLERANCE[kind], f"{kernel} ({n}x{k}, {rows} rows): {err:.3g} of the output"
        # the dequantize path on the GPU, for the record: the same tolerance holds for it
        assert relative_error(dequantize_linear(x_gpu, w_gpu), want) <= 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_demo_experts_with_kernels_agree_with_the_cpu_layer(method: str) -> None:
    """One layer of the demo model's experts quantized at load: CUDA bf16 with the kernels vs CPU float32 dequantize
    (the same integers and scales)."""
    cfg = ModelConfig.from_file(DEMO / "config.json")
    ckpt = Checkpoint(DEMO)
    quant = ExpertQuantization(8) if method == "int8" else ExpertQuantization(4, 64)
    cpu = load_expert_weights(ckpt, cfg, range(8), torch.float32, "cpu", progress=False, quantize=quant)
    gpu = load_expert_weights(ckpt, cfg, range(8), torch.bfloat16, "cuda", progress=False, quantize=quant)
    counts = [1, 0, 32, 3, 0, 7, 1, 2]
    rows = grouped_rows(counts, cfg.hidden_size, torch.float32, seed=6)
    for layer in range(cfg.num_layers):
        want = cpu.run_grouped(layer, rows, torch.tensor(counts))
        rows_gpu = rows.to("cuda", torch.bfloat16)
        if layer_kernels(gpu.w13[layer], gpu.w2[layer], rows_gpu) is None:
            require_kernel(method, str(rows_gpu.device))
        got = gpu.run_grouped(layer, rows_gpu, torch.tensor(counts, device="cuda"))
        assert relative_error(got, want) <= 3e-2


@pytest.mark.gpu
def test_fp8_checkpoint_on_cuda_keeps_fp8_experts_and_equals_the_cpu_engine(hf_small: HFCheckpoint,
                                                                             tmp_path: Path) -> None:
    """float32 on CUDA: FP8 experts are held in FP8 (on compute capability >= 8.9) and dequantized per call, which
    gives the CPU's numbers (where they are dequantized at load); bf16 runs them through scaled_mm."""
    fp8_checkpoint(hf_small, tmp_path / "fp8", "channel")
    ids = prompt_ids(96, 30, seed=8)
    logits = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
        ours = engine(tmp_path / "fp8", device=device, dtype=dtype)
        try:
            moe = ours.engine.moe
            assert isinstance(moe, MoELayer) and isinstance(moe.executor, InProcessExperts)
            experts = moe.executor.experts
            assert isinstance(experts, LocalExperts)
            if device == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
                assert experts.quantization == "fp8"
            logits[device, dtype] = ours.score([ids])[0].double().cpu()
        finally:
            ours.shutdown()
    exact = logits["cpu", "float32"]
    scale = exact.abs().max().item()
    assert (logits["cuda", "float32"] - exact).abs().max().item() <= 1e-4 * scale
    # bf16 with FP8 activations: per token within 15% of the largest logit, but for at most 3 of 30 tokens (a
    # rounding may flip a token's top-2 experts), and the median token within 5%
    err = (logits["cuda", "bfloat16"] - exact).abs().amax(-1) / scale
    assert int((err > 0.15).sum()) <= 3, err
    assert err.median().item() <= 0.05, err
