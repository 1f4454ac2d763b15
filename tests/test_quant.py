"""Quantized checkpoints and experts: FP8 checkpoints load the weights they mean, an unsupported quantization_config
is refused naming it, int8/int4 experts compute what their dequantized weights compute, and `moe-cluster quantize`
writes what quantizing at load holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from cluster.engine.loop import LocalEngine
from cluster.engine.sampling import SamplingParams
from cluster.engine_config import EngineConfig
from cluster.model.checkpoint import Checkpoint, load_expert_weights
from cluster.model.config import ModelConfig
from cluster.model.experts import LocalExperts
from cluster.model.quant import (
    ExpertQuantization,
    dequantize,
    pack_int4,
    pack_int32,
    quantize_weight,
    unpack_int4,
    unpack_int32,
)
from cluster.moe.layer import InProcessExperts, MoELayer
from tests.conftest import HFCheckpoint, make_hf_checkpoint
from tests.test_parity_hf import prompt_ids

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
ROUTER_OR_HEAD = ("block_sparse_moe.gate.weight", "lm_head.weight", "embed_tokens.weight")


def is_quantized_linear(name: str, tensor: Tensor) -> bool:
    """What FP8 checkpoints quantize: every Linear weight but the routers and the LM head."""
    return tensor.ndim == 2 and name.endswith(".weight") and not name.endswith(ROUTER_OR_HEAD)


def write_plain(src: Path, dst: Path, tensors: dict[str, Tensor]) -> Path:
    """A copy of checkpoint ``src`` (config, tokenizer) holding ``tensors`` in one file."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy2(path, dst / path.name)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def all_tensors(path: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out |= load_file(file)
    return out


def fp8_checkpoint(src: HFCheckpoint, dst: Path, scheme: str) -> dict[str, Tensor]:
    """Write ``src`` as an FP8 checkpoint and return the fp32 weights it stands for (FP8 values times scales).

    scheme "channel" / "tensor": compressed-tensors float-quantized with weight_scale (N, 1) / (1,);
    "block": transformers' fp8 with weight_scale_inv per [16, 16] block (ragged blocks where 16 does not divide).
    """
    stored, meant = {}, {}
    for name, w in all_tensors(src.path).items():
        if not is_quantized_linear(name, w):
            stored[name] = meant[name] = w
            continue
        if scheme == "channel":
            scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX  # (N, 1)
            full = scale
        elif scheme == "tensor":
            scale = (w.abs().amax() / FP8_MAX).reshape(1)  # (1,)
            full = scale
        else:
            n, k = w.shape
            blocks = torch.nn.functional.pad(w.abs(), (0, -k % 16, 0, -n % 16)).reshape(-(-n // 16), 16, -1, 16)
            scale = blocks.amax(dim=(1, 3)) / FP8_MAX  # (ceil(N/16), ceil(K/16))
            full = scale.repeat_interleave(16, 0)[:n].repeat_interleave(16, 1)[:, :k]
        q = (w / full).to(torch.float8_e4m3fn)
        stored[name] = q
        stored[name.removesuffix("weight") + ("weight_scale_inv" if scheme == "block" else "weight_scale")] = scale
        meant[name] = q.float() * full
    write_plain(src.path, dst, stored)
    raw = json.loads((dst / "config.json").read_text())
    if scheme == "block":
        raw["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": [16, 16]}
    else:
        raw["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"], "format": "float-quantized",
                "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": scheme, "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                      "dynamic": True}}},
            "ignore": ["lm_head", "re:.*block_sparse_moe.gate"]}
    (dst / "config.json").write_text(json.dumps(raw))
    return meant


def hf_model(path: Path) -> Any:
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def local_experts(ours: LocalEngine) -> LocalExperts:
    moe = ours.engine.moe
    assert isinstance(moe, MoELayer) and isinstance(moe.executor, InProcessExperts)
    assert isinstance(moe.executor.experts, LocalExperts)
    return moe.executor.experts


def engine(path: Path, **options: Any) -> LocalEngine:
    return LocalEngine.from_config(EngineConfig(model=str(path), progress=False, num_kv_blocks=64, block_size=8,
                                                **options))


def assert_matches_transformers(ours: LocalEngine, reference: Any, vocab: int) -> None:
    ids = prompt_ids(vocab, 30, seed=7)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
        want = reference.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    logits = ours.score([ids])[0]
    assert (logits - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    got = ours.generate([ids], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert got.completions[0].token_ids == want


# ---------------------------------------------------------------------------------------------- FP8 checkpoints

@pytest.mark.parametrize("scheme", ["channel", "tensor", "block"])
def test_fp8_checkpoint_equals_transformers_on_the_dequantized_weights(hf_small: HFCheckpoint, tmp_path: Path,
                                                                       scheme: str) -> None:
    meant = fp8_checkpoint(hf_small, tmp_path / "fp8", scheme)
    reference = hf_model(write_plain(hf_small.path, tmp_path / "dequantized", meant))
    ours = engine(tmp_path / "fp8")
    try:
        assert_matches_transformers(ours, reference, hf_small.config["vocab_size"])
        # the FP8 weights differ from the originals (the test could tell dequantized from original weights)
        original = load_expert_weights(Checkpoint(hf_small.path), ModelConfig.from_file(hf_small.path), range(8),
                                       torch.float32, progress=False).w2[0]
        loaded = local_experts(ours).w2[0]
        assert isinstance(loaded, Tensor) and isinstance(original, Tensor) and not torch.equal(loaded, original)
    finally:
        ours.shutdown()


def test_fp8_weight_without_its_scale_is_refused(hf_small: HFCheckpoint, tmp_path: Path) -> None:
    fp8_checkpoint(hf_small, tmp_path / "fp8", "channel")
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight_scale"]
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.k_proj.weight' .*float8_e4m3fn but has no "
                                         r"weight_scale"):
        engine(tmp_path / "fp8")


@pytest.mark.parametrize(("config", "named"), [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "quant_method='gptq'"),
    ({"quant_method": "awq", "bits": 4}, "quant_method='awq'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method='bitsandbytes'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                                           "group_size": 128}}}}, "symmetric=false"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size=[128]"),
])
def test_unsupported_quantization_config_is_refused_naming_it(tmp_path: Path, config: dict[str, Any],
                                                              named: str) -> None:
    ckpt = make_hf_checkpoint(tmp_path / "model")
    raw = json.loads((ckpt.path / "config.json").read_text())
    (ckpt.path / "config.json").write_text(json.dumps(raw | {"quantization_config": config}))
    with pytest.raises(ValueError) as err:
        engine(ckpt.path)
    assert named in str(err.value) and "supported: compressed-tensors" in str(err.value)


# ----------------------------------------------------------------------------------------- integer quantization

@pytest.mark.parametrize(("bits", "group", "k"), [(8, None, 40), (4, 16, 48), (4, 16, 40), (8, 32, 48)])
def test_each_weight_is_within_half_a_step_of_its_value(bits: int, group: int | None, k: int) -> None:
    """|w - q*s| <= s/2 with s = absmax/qmax of the weight's group: round to nearest, in the right group."""
    w = torch.randn(3, 12, k, generator=torch.Generator().manual_seed(bits + k)) * 0.05
    quant = ExpertQuantization(bits, group)
    qw = quantize_weight(w, quant)
    g = k if group is None else group
    error = (dequantize(qw, torch.float64) - w.double()).abs()  # (3, 12, K)
    for start in range(0, k, g):
        block = w[..., start:start + g].double()
        step = block.abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert (error[..., start:start + g] <= step / 2 * (1 + 1e-5)).all()
    assert qw.shape == w.shape and qw.scale.shape == (3, 12, -(-k // g))


def test_int4_values_pack_two_per_byte_and_back() -> None:
    q = torch.randint(-8, 8, (5, 7, 33), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 7, 17)
    assert torch.equal(unpack_int4(packed, 33), q)


def test_int32_packing_is_compressed_tensors_pack_to_int32() -> None:
    """The example of compressed-tensors' pack_to_int32 docstring: 8-bit [1, 2] -> 129, 130 -> 33409."""
    assert pack_int32(torch.tensor([[1, 2]], dtype=torch.int8), 8).tolist() == [[33409]]
    q = torch.randint(-8, 8, (4, 21), dtype=torch.int8)
    packed = pack_int32(q, 4)
    assert packed.dtype == torch.int32 and packed.shape == (4, 3)
    assert torch.equal(unpack_int32(packed, 4, 21), q)
    # element i of a word in bits [4i, 4i+4), offset by 8
    word = int(packed[0, 0])
    assert (word & 0xF) - 8 == int(q[0, 0]) and ((word >> 4) & 0xF) - 8 == int(q[0, 1])


@pytest.mark.parametrize(("method", "group"), [("int8", None), ("int4", 16)])
def test_quantized_experts_compute_what_their_dequantized_weights_compute(
        hf_small: HFCheckpoint, tmp_path: Path, method: str, group: int | None) -> None:
    """transformers on the dequantized expert weights (attention, routers untouched) is the reference."""
    quant = ExpertQuantization(8 if method == "int8" else 4, group)
    meant = {name: (dequantize(quantize_weight(w, quant), torch.float32) if ".experts." in name else w)
             for name, w in all_tensors(hf_small.path).items()}
    reference = hf_model(write_plain(hf_small.path, tmp_path / "dequantized", meant))
    ours = engine(hf_small.path, quantize_experts=method, quantize_group_size=group)
    try:
        assert local_experts(ours).quantization == (method if group is None else f"{method}-g{group}")
        assert_matches_transformers(ours, reference, hf_small.config["vocab_size"])
    finally:
        ours.shutdown()


def test_quantize_command_output_loads_back_as_quantizing_at_load(hf_small: HFCheckpoint, tmp_path: Path) -> None:
    from router_service.cli import main

    out = tmp_path / "int4"
    assert main(["quantize", str(hf_small.path), str(out), "--bits", "4", "--group-size", "16"]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert config["config_groups"]["group_0"]["weights"] | {"num_bits": 4, "group_size": 16, "strategy": "group"} \
        == config["config_groups"]["group_0"]["weights"]
    before, after = all_tensors(hf_small.path), all_tensors(out)
    name = "model.layers.1.block_sparse_moe.experts.3.w2"
    assert name + ".weight" not in after and after[name + ".weight_packed"].dtype == torch.int32
    assert after[name + ".weight_shape"].tolist() == list(before[name + ".weight"].shape)
    assert all(torch.equal(t, after[n]) for n, t in before.items() if ".experts." not in n)  # the rest untouched

    stored = engine(out)
    at_load = engine(hf_small.path, quantize_experts="int4", quantize_group_size=16)
    try:
        assert local_experts(stored).quantization == "int4-g16"
        assert local_experts(stored).nbytes == local_experts(at_load).nbytes
        ids = [prompt_ids(96, n, seed=n) for n in (25, 9)]
        for a, b in zip(stored.score(ids), at_load.score(ids), strict=True):
            assert torch.equal(a, b)
    finally:
        stored.shutdown()
        at_load.shutdown()
    with pytest.raises(ValueError, match="already holds int4 experts"):
        engine(out, quantize_experts="int8")
    assert main(["quantize", str(out), str(tmp_path / "again"), "--bits", "8"]) == 1  # already quantized


def test_quantize_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="quantize_experts must be 'int8' or 'int4', got 'int3'"):
        EngineConfig(model="m", quantize_experts="int3")
    with pytest.raises(ValueError, match="quantize_group_size=32 needs quantize_experts"):
        EngineConfig(model="m", quantize_group_size=32)
    with pytest.raises(ValueError, match="group size must be an even integer >= 2, got 7"):
        EngineConfig(model="m", quantize_experts="int4", quantize_group_size=7)


def test_transformers_with_compressed_tensors_reads_the_quantize_output(hf_small: HFCheckpoint, tmp_path: Path) -> None:
    """The ecosystem check: transformers' compressed-tensors integration decompresses what `moe-cluster quantize`
    wrote to the same model (needs the optional `interop` extra: pip install compressed-tensors)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from cluster.model.quantize_checkpoint import quantize_checkpoint

    out = quantize_checkpoint(hf_small.path, tmp_path / "int4", ExpertQuantization(4, 16), progress=False)
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = prompt_ids(96, 30, seed=3)
    with torch.no_grad():
        expected = reference.eval()(torch.tensor([ids])).logits[0]
    ours = engine(out)
    try:
        logits = ours.score([ids])[0]
    finally:
        ours.shutdown()
    assert (logits - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize(("method", "group"), [("int8", None), ("int4", 16)])
def test_quantized_experts_on_cuda_equal_the_cpu_engine(hf_small: HFCheckpoint, method: str, group: int | None
                                                        ) -> None:
    """The same integers and scales on a GPU (dequantized per call there too) give the CPU engine's logits."""
    ids = prompt_ids(96, 30, seed=4)
    logits = []
    for device in ("cpu", "cuda"):
        ours = engine(hf_small.path, device=device, quantize_experts=method, quantize_group_size=group)
        try:
            logits.append(ours.score([ids])[0].cpu())
        finally:
            ours.shutdown()
    assert (logits[1] - logits[0]).abs().max().item() <= 1e-4 * logits[0].abs().max().item()


def test_serve_and_generate_flags_reach_the_engine_options(demo_dir: Path) -> None:
    from router_service.cli import build_parser
    from router_service.serve_config import resolve_config
    from router_service.settings import AppSettings

    args = build_parser().parse_args(["serve", "--model", str(demo_dir), "--quantize-experts", "int4",
                                      "--quantize-group-size", "32"])
    app_args = resolve_config(args)["applications"][0]["args"]
    assert app_args["engine_options"] | {"quantize_experts": "int4", "quantize_group_size": 32} \
        == app_args["engine_options"]
    assert AppSettings.from_args(app_args).engine_config().expert_quantization == ExpertQuantization(4, 32)
    generate = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--quantize-experts", "int8"])
    assert generate.quantize_experts == "int8" and generate.quantize_group_size is None
