"""Builds engines from a checkpoint directory: the coordinator part is loaded here, the experts by a
MoE backend factory (all of them in-process for the local engine; an expert pool's for a coordinator)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from cluster.engine.llm_engine import LLMEngine
from cluster.engine.validation import resolve_max_model_len
from cluster.engine_config import ClusterConfig, EngineConfig
from cluster.model.checkpoint import Checkpoint, load_coordinator_weights, load_expert_weights
from cluster.model.config import ModelConfig, parse_dtype
from cluster.model.forward import MixtralTransformer, MoEBackend
from cluster.model.kv_cache import blocks_for, kv_bytes_per_block
from cluster.model.quant import ExpertQuantization
from cluster.model.tokenizer import Tokenizer
from cluster.moe.layer import InProcessExperts, MoELayer
from cluster.moe.prefetch import prefetcher_for

if TYPE_CHECKING:  # the local engine must not import Ray: a GPU box without Ray still runs it
    from cluster.moe.pool_api import PoolHandle

log = logging.getLogger("moe_cluster.loader")

# (model config, checkpoint, dtype, device) -> the MoE backend of the engine
MoEFactory = Callable[[ModelConfig, Checkpoint, torch.dtype, torch.device], MoEBackend]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available")
    return device


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 * 2**30


def kv_cache_blocks(model_cfg: ModelConfig, engine_cfg: EngineConfig, dtype: torch.dtype,
                    device: torch.device | None, max_model_len: int) -> int:
    """Blocks that fit the budget, capped at what max_num_seqs full-length sequences could ever use. Refuses a
    budget that cannot hold one max_model_len sequence (check_kv_holds_one_sequence). ``device`` None: only a
    budget in GiB can be sized (before anything is loaded)."""
    if engine_cfg.num_kv_blocks is not None:  # an exact count (tests): small caches on purpose, no check
        return engine_cfg.num_kv_blocks
    per_block = kv_bytes_per_block(model_cfg, engine_cfg.block_size, dtype)
    if engine_cfg.kv_cache_gib is not None:
        budget = engine_cfg.kv_cache_gib * 2**30
    else:
        assert device is not None, "a KV budget as a fraction of free memory needs the device"
        budget = available_memory_bytes(device) * engine_cfg.kv_cache_fraction
    blocks = int(budget // per_block)
    check_kv_holds_one_sequence(blocks, per_block, engine_cfg, max_model_len, budget)
    return min(blocks, engine_cfg.max_num_seqs * blocks_for(max_model_len, engine_cfg.block_size))


def check_kv_holds_one_sequence(blocks: int, per_block: int, engine_cfg: EngineConfig, max_model_len: int,
                                budget: float) -> None:
    """vLLM's start-up check: a KV cache that cannot hold one max_model_len sequence would refuse requests the
    API accepts (a chat request without max_tokens asks for the whole context). Names the numbers and the flags
    (and serve.yaml engine_options) that fix it."""
    bs = engine_cfg.block_size
    need_blocks = blocks_for(max_model_len, bs)
    if blocks >= need_blocks:
        return
    need_gib = need_blocks * per_block / 2**30
    where = (f"--kv-cache-gib {engine_cfg.kv_cache_gib:g}" if engine_cfg.kv_cache_gib is not None
             else f"--kv-cache-fraction {engine_cfg.kv_cache_fraction:g} of the free memory")
    raise ValueError(
        f"the KV cache ({where}: {budget / 2**30:.3f} GiB, {blocks} blocks of {bs} tokens = {blocks * bs} tokens "
        f"at {per_block // bs} bytes per token) cannot hold one sequence of max_model_len={max_model_len} tokens, "
        f"which needs {need_gib:.3f} GiB. Lower --max-model-len to at most {blocks * bs} (engine_options."
        f"max_model_len), or give the KV cache at least --kv-cache-gib {need_gib:.3f} (engine_options.kv_cache_gib)"
        f" or a larger --kv-cache-fraction (engine_options.kv_cache_fraction)")


def engine_dtype(model_cfg: ModelConfig, engine_cfg: EngineConfig) -> torch.dtype:
    return parse_dtype(engine_cfg.dtype or model_cfg.dtype)


def build_engine(engine_cfg: EngineConfig, make_moe: MoEFactory, threads: int | None = None) -> LLMEngine:
    """The engine, built on the thread that will run it. ``threads``: torch intra-op threads set first, on this
    thread (OpenMP's count is per thread on some builds: a thread started after its process set the count may still
    run every op on all the node's cores); None leaves the count as it is."""
    if threads is not None:
        torch.set_num_threads(threads)
    model_dir = engine_cfg.model_dir()
    model_cfg = ModelConfig.from_file(model_dir)
    tokenizer = Tokenizer(model_dir, engine_cfg.chat_template_text())
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model_cfg.vocab_size}")
    max_model_len = resolve_max_model_len(model_cfg, engine_cfg)
    device = resolve_device(engine_cfg.device)
    dtype = engine_dtype(model_cfg, engine_cfg)
    ckpt = Checkpoint(model_dir)
    log.info("loading %s (%d layers, %d experts, hidden %d) as %s on %s", engine_cfg.model, model_cfg.num_layers,
             model_cfg.num_experts, model_cfg.hidden_size, str(dtype).removeprefix("torch."), device)
    weights = load_coordinator_weights(ckpt, model_cfg, dtype, device, progress=engine_cfg.progress)
    moe = make_moe(model_cfg, ckpt, dtype, device)
    num_blocks = kv_cache_blocks(model_cfg, engine_cfg, dtype, device, max_model_len)
    log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, engine_cfg.block_size,
             num_blocks * kv_bytes_per_block(model_cfg, engine_cfg.block_size, dtype) / 2**20)
    transformer = MixtralTransformer(model_cfg, weights)
    transformer.on_moe_input = prefetcher_for(moe, weights, model_cfg)  # issue 23: None unless workers cache experts
    return LLMEngine(model_cfg, engine_cfg, tokenizer, transformer, moe, num_blocks)


def local_moe(progress: bool = True, quantize: ExpertQuantization | None = None) -> MoEFactory:
    def make(model_cfg: ModelConfig, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> MoEBackend:
        experts = load_expert_weights(ckpt, model_cfg, range(model_cfg.num_experts), dtype, device, progress,
                                      quantize=quantize)
        log.info("experts: %.1f MiB resident (%s)", experts.nbytes / 2**20, experts.quantization or "not quantized")
        return MoELayer(InProcessExperts(experts, model_cfg.num_experts), model_cfg.num_layers, model_cfg.num_experts,
                        model_cfg.experts_per_token)

    return make


def distributed_moe(pool: PoolHandle, coordinator_id: str, cluster_cfg: ClusterConfig) -> MoEFactory:
    """The experts of an expert pool: attach to it and link to each of its workers."""
    from cluster.moe.linked_experts import LinkedExperts  # imports Ray: only a coordinator needs it

    def make(model_cfg: ModelConfig, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device) -> MoEBackend:
        return MoELayer(LinkedExperts(pool, coordinator_id, cluster_cfg, device), model_cfg.num_layers,
                        model_cfg.num_experts, model_cfg.experts_per_token, cluster_cfg.micro_batches,
                        cluster_cfg.micro_batch_min_tokens)

    return make


def build_local_engine(engine_cfg: EngineConfig) -> LLMEngine:
    return build_engine(engine_cfg, local_moe(engine_cfg.progress, engine_cfg.expert_quantization))
