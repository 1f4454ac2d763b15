"""Train the demo model: a small Mixtral (top-2 of 8 experts, GQA, sliding window) on the King James Bible.

    apt-get install bible-kjv                      # the text (training/kjv.py names source and licence)
    python training/train_demo.py --out cluster/demo_model [--device cuda] [--steps 400]

Everything the result depends on is here: the seed, the data preparation (training/kjv.py), the tokenizer
(BPE with byte fallback, Mistral's scheme, trained with ``tokenizers`` on the training text), the architecture
and the hyper-parameters (TrainConfig). The forward pass is the project's own math (cluster/model/ops.py: rms_norm,
RoPE, route, expert_swiglu, combine) written for whole sequences, plus the usual router load-balancing loss
(Switch Transformer / Mixtral: E * sum_e f_e * P_e). The checkpoint is written in Hugging Face's Mixtral
format (bf16 safetensors, config.json, tokenizer.json, tokenizer_config.json with a chat template), with the
loss curve as a PNG and a README naming the text's source and licence.

Shape legend: B sequences in a batch, L tokens a sequence, H hidden, Q/KV heads, D head dim, E experts,
K experts per token, T = B * L tokens flattened at the MoE boundary, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.model.config import ModelConfig  # noqa: E402
from cluster.model.demo import build_tokenizer, write_tokenizer_files  # noqa: E402
from cluster.model.demo import write_checkpoint as write_safetensors  # noqa: E402
from cluster.model.ops import apply_rope, attention_mask, combine, expert_swiglu, rms_norm, rope_cos_sin, rope_inv_freq  # noqa: E402
from cluster.model.ops import route as route_top_k  # noqa: E402
from training.kjv import load_corpus  # noqa: E402


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    sliding_window: int = 256  # trained on 512-token windows: the model never attends further than it learned
    seq_len: int = 512
    batch_size: int = 32
    steps: int = 400
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.02  # router load balancing (HF Mixtral's router_aux_loss_coef default is 0.001)
    eval_every: int = 25


def model_config(tc: TrainConfig) -> ModelConfig:
    return ModelConfig(vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
                       intermediate_size=tc.intermediate_size, num_layers=tc.num_layers, num_heads=tc.num_heads,
                       num_kv_heads=tc.num_kv_heads, head_dim=tc.hidden_size // tc.num_heads, num_experts=8,
                       experts_per_token=2, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=tc.sliding_window,
                       max_position_embeddings=4096, tie_word_embeddings=False, dtype="float32",
                       bos_token_id=1, eos_token_ids=(2,))


class TrainingMixtral(nn.Module):
    """The Mixtral forward pass over whole sequences (B, L), parameters named as in HF checkpoints."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, q, kv, i, e = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                          cfg.intermediate_size, cfg.num_experts)
        self.embed = nn.Parameter(torch.randn(cfg.vocab_size, h) * 0.02)
        self.lm_head = nn.Parameter(torch.randn(cfg.vocab_size, h) * 0.02)
        self.norm = nn.Parameter(torch.ones(h))
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)  # GPT-2's scaling of residual-writing matrices
        self.layers: list[nn.ParameterDict] = nn.ModuleList()  # type: ignore[assignment]
        for _ in range(cfg.num_layers):
            layer = nn.ParameterDict({
                "input_layernorm": nn.Parameter(torch.ones(h)),
                "q_proj": nn.Parameter(torch.randn(q, h) * 0.02),
                "k_proj": nn.Parameter(torch.randn(kv, h) * 0.02),
                "v_proj": nn.Parameter(torch.randn(kv, h) * 0.02),
                "o_proj": nn.Parameter(torch.randn(h, q) * out_std),
                "post_attention_layernorm": nn.Parameter(torch.ones(h)),
                "gate": nn.Parameter(torch.randn(e, h) * 0.02),
                "w13": nn.Parameter(torch.randn(e, 2 * i, h) * 0.02),  # [w1; w3] per expert
                "w2": nn.Parameter(torch.randn(e, h, i) * out_std),
            })
            self.layers.append(layer)
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens (B, L) -> logits (B, L, V), load-balancing loss (scalar, mean over layers)."""
        cfg = self.cfg
        _b, seq = tokens.shape
        positions = torch.arange(seq, device=tokens.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.embed.dtype)  # (L, D)
        valid = torch.ones(seq, dtype=torch.bool, device=tokens.device)
        mask = attention_mask(positions, positions, valid, cfg.sliding_window)[None, None]  # (1, 1, L, L)
        x = F.embedding(tokens, self.embed)  # (B, L, H)
        aux = x.new_zeros(())
        for layer in self.layers:
            x = x + self._attention(layer, rms_norm(x, layer["input_layernorm"], cfg.rms_norm_eps), cos, sin, mask)
            moe_out, layer_aux = self._moe(layer, rms_norm(x, layer["post_attention_layernorm"], cfg.rms_norm_eps))
            x = x + moe_out
            aux = aux + layer_aux
        x = rms_norm(x, self.norm, cfg.rms_norm_eps)
        return F.linear(x, self.lm_head), aux / cfg.num_layers

    def _attention(self, layer: nn.ParameterDict, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        cfg = self.cfg
        b, seq, _ = x.shape
        q = F.linear(x, layer["q_proj"]).view(b * seq, cfg.num_heads, cfg.head_dim)  # (B*L, Q, D)
        k = F.linear(x, layer["k_proj"]).view(b * seq, cfg.num_kv_heads, cfg.head_dim)  # (B*L, KV, D)
        v = F.linear(x, layer["v_proj"]).view(b, seq, cfg.num_kv_heads, cfg.head_dim)
        cos_t, sin_t = cos.repeat(b, 1), sin.repeat(b, 1)  # (B*L, D)
        q = apply_rope(q, cos_t, sin_t).view(b, seq, cfg.num_heads, cfg.head_dim).transpose(1, 2)  # (B, Q, L, D)
        k = apply_rope(k, cos_t, sin_t).view(b, seq, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask, enable_gqa=True)
        return F.linear(out.transpose(1, 2).reshape(b, seq, -1), layer["o_proj"])  # (B, L, H)

    def _moe(self, layer: nn.ParameterDict, x: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (T, H)
        weights, expert_ids = route_top_k(flat, layer["gate"], cfg.experts_per_token)  # (T, K) each
        rows_token = torch.arange(flat.shape[0], device=x.device).repeat_interleave(cfg.experts_per_token)  # (T*K,)
        rows_expert = expert_ids.reshape(-1)  # (T*K,)
        order = torch.argsort(rows_expert, stable=True)  # rows grouped by expert
        counts = torch.bincount(rows_expert, minlength=cfg.num_experts).tolist()
        outs = []
        for expert, rows in zip(range(cfg.num_experts), torch.split(order, counts), strict=True):
            outs.append(expert_swiglu(flat[rows_token[rows]], layer["w13"][expert], layer["w2"][expert]))
        expert_out = torch.cat(outs)  # (T*K, H) in grouped order
        out = combine(expert_out, weights.reshape(-1)[order], rows_token[order], flat.shape[0])  # (T, H)
        # Load balancing (Switch Transformer, as HF Mixtral): fraction of rows per expert times mean router prob.
        probs = torch.softmax(F.linear(flat, layer["gate"]).float(), dim=-1)  # (T, E)
        fraction = torch.tensor(counts, dtype=torch.float32, device=x.device) / rows_expert.numel()
        aux = cfg.num_experts * (fraction * probs.mean(0)).sum()
        return out.view(shape), aux

    def hf_state_dict(self) -> dict[str, Tensor]:
        """Parameters under the names of a Hugging Face Mixtral checkpoint."""
        cfg = self.cfg
        out = {"model.embed_tokens.weight": self.embed, "lm_head.weight": self.lm_head, "model.norm.weight": self.norm}
        for n, layer in enumerate(self.layers):
            p = f"model.layers.{n}"
            for name in ("input_layernorm", "post_attention_layernorm"):
                out[f"{p}.{name}.weight"] = layer[name]
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[f"{p}.self_attn.{name}.weight"] = layer[name]
            out[f"{p}.block_sparse_moe.gate.weight"] = layer["gate"]
            for e in range(cfg.num_experts):
                w1, w3 = layer["w13"][e].chunk(2, dim=0)  # (I, H) each
                out[f"{p}.block_sparse_moe.experts.{e}.w1.weight"] = w1
                out[f"{p}.block_sparse_moe.experts.{e}.w3.weight"] = w3
                out[f"{p}.block_sparse_moe.experts.{e}.w2.weight"] = layer["w2"][e]
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def encode_chapters(tok: Tokenizer, chapters: list[str]) -> Tensor:
    """Every chapter's tokens (each starting with <s>, ending with </s>) concatenated into one 1-D stream."""
    ids: list[int] = []
    for encoding in tok.encode_batch(chapters):
        ids.extend([*encoding.ids, 2])
    return torch.tensor(ids, dtype=torch.long)


def batches(stream: Tensor, tc: TrainConfig, gen: torch.Generator) -> Iterator[Tensor]:
    """Random windows of seq_len + 1 tokens (inputs and next-token targets)."""
    while True:
        starts = torch.randint(0, stream.numel() - tc.seq_len - 1, (tc.batch_size,), generator=gen)
        yield torch.stack([stream[s:s + tc.seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: TrainingMixtral, stream: Tensor, tc: TrainConfig, device: torch.device) -> float:
    """Mean next-token loss over consecutive windows of the stream (every token predicted once)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, stream.numel() - 1, tc.seq_len):
        chunk = stream[start:start + tc.seq_len + 1].to(device)[None]  # (1, <= L+1)
        if chunk.shape[1] < 2:
            break
        logits, _ = model(chunk[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    model.train()
    return total / count


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress))


def write_checkpoint(out: Path, tok: Tokenizer, cfg: ModelConfig, tensors: dict[str, Tensor], tc: TrainConfig,
                     history: dict, corpus_note: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(out, tok, cfg.max_position_embeddings)
    # Stored in bf16 (half the bytes), one shard per layer's experts (each under 10 MB); config.json says
    # float32, so every engine computes in float32 from these values.
    write_safetensors(out, cfg, tensors, shards=cfg.num_layers + 1, storage_dtype=torch.bfloat16)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0]}, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps({"train_config": asdict(tc), **history}, indent=2) + "\n")
    (out / "README.md").write_text(corpus_note)


def plot_losses(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s for s, _ in history["train_loss"]], [v for _, v in history["train_loss"]], label="train (batch)")
    ax.plot([s for s, _ in history["validation_loss"]], [v for _, v in history["validation_loss"]], "o-",
            label="validation (Ruth)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Demo model training (King James Bible, 8 experts top-2)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


CORPUS_NOTE = """\
# moe-cluster demo model

A small Mixtral-architecture model (8 experts, top-2 routing, grouped-query attention, sliding window {window})
of {params:,} parameters, trained by `training/train_demo.py` (seed {seed}, {steps} steps, {tokens:,} training
tokens; {train_time}).

Text: the King James Version of the Bible (1611, public domain), from Debian's `bible-kjv-text` package
(printed by its `bible` program, package `bible-kjv`, GPL-2+ for the program). The books of Ruth (validation)
and Jonah (test: `tests/data/kjv_jonah.txt`) are held out of training. The weights are released under the
project's licence (Apache-2.0).

Held-out loss: Ruth {val:.3f} nats/token, Jonah {test:.3f} (perplexity {ppl:.2f}), computed by the trainer.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "cluster" / "demo_model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--text", type=Path, help="the `bible -f Gen1:1-Rev22:21` output, if already dumped")
    parser.add_argument("--loss-png", type=Path, default=ROOT / "docs" / "demo_training_loss.png")
    args = parser.parse_args(argv)
    tc = replace(TrainConfig(), steps=args.steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(tc.seed)
    started = time.monotonic()

    corpus = load_corpus(args.text.read_text() if args.text else None)
    print(f"text: {len(corpus.train)} training chapters, {len(corpus.validation)} validation (Ruth), "
          f"{len(corpus.test)} test (Jonah)", flush=True)
    tok = build_tokenizer(tc.vocab_size, corpus.train)
    cfg = model_config(replace(tc, vocab_size=tok.get_vocab_size(with_added_tokens=True)))
    train_stream = encode_chapters(tok, corpus.train)
    val_stream, test_stream = encode_chapters(tok, corpus.validation), encode_chapters(tok, corpus.test)
    print(f"tokenizer: {cfg.vocab_size} tokens; {train_stream.numel():,} training tokens", flush=True)

    model = TrainingMixtral(cfg).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters on {device}", flush=True)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(tc.seed)
    history: dict = {"train_loss": [], "validation_loss": [], "aux_loss": []}
    best: tuple[float, int, dict[str, Tensor]] | None = None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    data = batches(train_stream, tc, gen)
    bar = tqdm(range(tc.steps), desc="training", unit="step", file=sys.stdout)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        batch = next(data).to(device)
        with autocast:
            logits, aux = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        (loss + tc.aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history["train_loss"].append((step, round(loss.item(), 4)))
        history["aux_loss"].append((step, round(aux.item(), 4)))
        bar.set_postfix(loss=f"{loss.item():.3f}", aux=f"{aux.item():.3f}")
        if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
            val = evaluate(model, val_stream, tc, device)
            history["validation_loss"].append((step + 1, round(val, 4)))
            bar.write(f"step {step + 1}: validation loss {val:.4f}")
            if best is None or val < best[0]:
                best = (val, step + 1, {k: v.clone() for k, v in model.hf_state_dict().items()})
    assert best is not None
    elapsed = time.monotonic() - started
    val, best_step, tensors = best
    # Test loss of the chosen weights, as stored (bf16) and computed in float32.
    eval_model = TrainingMixtral(cfg)
    load_hf_tensors(eval_model, {k: v.to(torch.bfloat16).float() for k, v in tensors.items()})
    test = evaluate(eval_model.to(device), test_stream, tc, device)
    history |= {"best_step": best_step, "validation_loss_best": round(val, 4), "test_loss": round(test, 4),
                "test_perplexity": round(math.exp(test), 3), "seconds": round(elapsed, 1), "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "parameters": params, "training_tokens": tc.steps * tc.batch_size * tc.seq_len}
    train_time = f"{elapsed:.0f} s on {history['device_name']}"
    note = CORPUS_NOTE.format(window=cfg.sliding_window, params=params, seed=tc.seed, steps=best_step,
                              tokens=best_step * tc.batch_size * tc.seq_len, train_time=train_time, val=val,
                              test=test, ppl=math.exp(test))
    write_checkpoint(args.out, tok, cfg, tensors, tc, history, note)
    args.loss_png.parent.mkdir(parents=True, exist_ok=True)
    plot_losses(history, args.loss_png)
    print(f"done in {elapsed:.0f} s: best step {best_step}, validation {val:.4f}, test {test:.4f} "
          f"(perplexity {math.exp(test):.2f}); wrote {args.out} and {args.loss_png}", flush=True)
    return 0


def load_hf_tensors(model: TrainingMixtral, tensors: dict[str, Tensor]) -> None:
    """The inverse of hf_state_dict (for evaluating saved weights)."""
    with torch.no_grad():
        model.embed.copy_(tensors["model.embed_tokens.weight"])
        model.lm_head.copy_(tensors["lm_head.weight"])
        model.norm.copy_(tensors["model.norm.weight"])
        for n, layer in enumerate(model.layers):
            p = f"model.layers.{n}"
            for name in ("input_layernorm", "post_attention_layernorm"):
                layer[name].copy_(tensors[f"{p}.{name}.weight"])
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                layer[name].copy_(tensors[f"{p}.self_attn.{name}.weight"])
            layer["gate"].copy_(tensors[f"{p}.block_sparse_moe.gate.weight"])
            for e in range(model.cfg.num_experts):
                e_p = f"{p}.block_sparse_moe.experts.{e}"
                layer["w13"][e].copy_(torch.cat([tensors[f"{e_p}.w1.weight"], tensors[f"{e_p}.w3.weight"]]))
                layer["w2"][e].copy_(tensors[f"{e_p}.w2.weight"])


if __name__ == "__main__":
    raise SystemExit(main())
