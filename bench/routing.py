"""Routing statistics on held-out text (Jonah, tests/data/kjv_jonah.txt), the trained demo beside the random one,
measured as the reference texts describe routing (Mixtral paper, section 5; next-layer gate prediction as in
Pre-gated MoE / speculative expert prefetching):

* usage: the entropy (bits; 3 = all 8 experts alike) of each layer's routed rows over its experts, and the
  hottest expert's rows over the mean expert's;
* adjacency: how often a token's two experts include the previous token's first-choice expert (chance for top-2
  of 8: 2/8), how often its first choice repeats the previous token's (chance 1/8); beside each, the same measure
  on tokens paired at random (a baseline with the layer's real, uneven usage);
* look-ahead: the recall of guessing layer l+1's (and l+2's) two experts by applying that layer's router
  (its post-attention RMSNorm, then its gate) to layer l's output, the hidden state before layer l+1's attention
  (chance: 2/8).

Routing is read from ``transformers``' MixtralForCausalLM (float32) through forward hooks: the router input is
the post-attention RMSNorm's output, the choice is the top-2 of the gate's logits (as Mixtral's router does).
Each chapter is one forward pass (at most ``--max-tokens`` tokens, <s> first).

    python -m bench.routing [--model cluster/demo_model] [--png docs/demo_routing.png]

Writes the "routing" section of docs/benchmarks.md and a PNG of one passage's tokens coloured by their
first-choice expert in each layer (like the Mixtral paper's routing figure).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.common import ROOT, machine, progress, table, write_section

DEFAULT_MODEL = ROOT / "cluster" / "demo_model"
DEFAULT_TEXT = ROOT / "tests" / "data" / "kjv_jonah.txt"
DEFAULT_PNG = ROOT / "docs" / "demo_routing.png"


@dataclass
class Trace:
    """One forward pass's routing. T tokens, N layers, K experts per token."""

    chosen: list[Tensor]  # [layer] (T, K) expert ids, best first
    ahead: dict[tuple[int, int], Tensor]  # (from layer l, to layer m > l) -> (T, K) guessed experts of layer m


def trace(model: Any, ids: list[int], lookahead: int = 2) -> Trace:
    """Run ``model`` on ``ids`` and record each layer's chosen experts and the look-ahead guesses."""
    layers = model.model.layers
    cfg = model.config
    k = cfg.num_experts_per_tok
    gates = [_gate_weight(model, n) for n in range(len(layers))]  # [layer] (E, H)
    router_in: dict[int, Tensor] = {}
    layer_out: dict[int, Tensor] = {}
    hooks = []
    for n, layer in enumerate(layers):
        hooks.append(layer.post_attention_layernorm.register_forward_hook(
            lambda _m, _i, out, n=n: router_in.__setitem__(n, out[0].detach())))
        hooks.append(layer.register_forward_hook(
            lambda _m, _i, out, n=n: layer_out.__setitem__(n, (out[0] if isinstance(out, tuple) else out)[0].detach())))
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
            chosen = [torch.topk(router_in[n].float() @ gates[n].T, k, dim=-1).indices for n in range(len(layers))]
            ahead = {}
            for n in range(len(layers)):
                for step in range(1, lookahead + 1):
                    m = n + step
                    if m >= len(layers):
                        continue
                    normed = layers[m].post_attention_layernorm(layer_out[n])  # (T, H): layer m's router input guess
                    ahead[(n, m)] = torch.topk(normed.float() @ gates[m].T, k, dim=-1).indices
    finally:
        for h in hooks:
            h.remove()
    return Trace(chosen, ahead)


def _gate_weight(model: Any, layer: int) -> Tensor:
    prefix = f"model.layers.{layer}."
    names = [name for name, _ in model.named_parameters() if name.startswith(prefix) and name.endswith("gate.weight")]
    assert len(names) == 1, names
    return dict(model.named_parameters())[names[0]].detach().float()  # (E, H)


def layer_stats(traces: Sequence[Trace], layer: int, num_experts: int, gen: torch.Generator) -> dict[str, float]:
    """The table's numbers for one layer over all traces (adjacent pairs never cross a trace's boundary)."""
    chosen = [t.chosen[layer] for t in traces]  # each (T, K)
    rows = torch.cat([c.reshape(-1) for c in chosen])
    counts = torch.bincount(rows, minlength=num_experts).double()
    p = counts / counts.sum()
    entropy = -sum(float(x) * math.log2(float(x)) for x in p if x > 0)
    prev_first = torch.cat([c[:-1, 0] for c in chosen])  # (P,) previous token's first choice
    cur = torch.cat([c[1:] for c in chosen])  # (P, K) this token's choices
    all_tokens = torch.cat(chosen)  # (T_all, K)
    shuffled = all_tokens[torch.randperm(all_tokens.shape[0], generator=gen)][: prev_first.shape[0]]
    stats = {
        "entropy": entropy, "hot_over_mean": float(counts.max() / counts.mean()),
        "prev_in_top2": float((cur == prev_first[:, None]).any(-1).double().mean()),
        "prev_in_top2_shuffled": float((shuffled == prev_first[:, None]).any(-1).double().mean()),
        "first_repeat": float((cur[:, 0] == prev_first).double().mean()),
        "first_repeat_shuffled": float((shuffled[:, 0] == prev_first).double().mean()),
    }
    for step in (1, 2):
        key = (layer - step, layer)
        guesses = [(t.ahead[key], t.chosen[layer]) for t in traces if key in t.ahead]
        if guesses:
            hit = sum(float((g[:, :, None] == c[:, None, :]).any(-1).double().sum()) for g, c in guesses)
            stats[f"recall_{step}"] = hit / sum(c.numel() for _, c in guesses)
    return stats


def draw_passage(model: Any, tokenizer: Any, ids: list[int], path: Path, title: str) -> None:
    """One passage's tokens per layer, each on a box coloured by its first-choice expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t = trace(model, ids, lookahead=0)
    pieces = [tokenizer.decode([i], skip_special_tokens=False).replace("\n", " ") or " " for i in ids]
    num_layers = len(t.chosen)
    colours = [plt.get_cmap("tab10")(i) for i in range(10)]
    width_chars, line_h = 92, 1.0
    # Lay the tokens out once (a monospace width per character), then draw the layout per layer.
    layout, x, y = [], 0, 0
    for piece in pieces:
        w = max(1, len(piece))
        if x + w > width_chars:
            x, y = 0, y + 1
        layout.append((x, y, w))
        x += w
    lines = y + 1
    fig, axes = plt.subplots(num_layers, 1, figsize=(13, (lines * 0.32 + 0.5) * num_layers + 0.6))
    for layer, ax in enumerate(axes):
        first = t.chosen[layer][:, 0].tolist()
        for (x0, y0, w), piece, expert in zip(layout, pieces, first, strict=True):
            ax.add_patch(plt.Rectangle((x0, -y0 * line_h - 0.9), w, 0.85, color=colours[expert % 10], alpha=0.55,
                                       linewidth=0))
            ax.text(x0, -y0 * line_h - 0.5, piece, family="monospace", fontsize=8, va="center", ha="left")
        ax.set_xlim(0, width_chars)
        ax.set_ylim(-lines * line_h - 0.1, 0.1)
        ax.axis("off")
        ax.set_title(f"layer {layer}", fontsize=9, loc="left")
    handles = [Patch(color=colours[e], alpha=0.55, label=f"expert {e}") for e in range(model.config.num_local_experts)]
    fig.legend(handles=handles, loc="lower center", ncol=8, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure(model_dir: Path, chapters: Sequence[str], max_tokens: int, seed: int = 0) -> list[dict[str, float]]:
    from transformers import AutoModelForCausalLM

    from cluster.model.tokenizer import Tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = Tokenizer(model_dir)
    traces = [trace(model, tok.encode(ch)[:max_tokens]) for ch in chapters]
    gen = torch.Generator().manual_seed(seed)
    return [layer_stats(traces, n, model.config.num_local_experts, gen) for n in range(model.config.num_hidden_layers)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--max-tokens", type=int, default=1024, help="most tokens per chapter (one forward each)")
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG)
    parser.add_argument("--passage-tokens", type=int, default=120)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    before = os.getloadavg()
    progress(f"load average before: {before[0]:.1f} {before[1]:.1f} {before[2]:.1f}")
    chapters = [line.strip() for line in args.text.read_text().splitlines() if line.strip()]

    from cluster.model.demo import init_demo
    from cluster.model.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        random_dir = init_demo(Path(tmp) / "random")
        results = {"trained": measure(args.model, chapters, args.max_tokens),
                   "random (init-demo --random)": measure(random_dir, chapters, args.max_tokens)}
    progress("measured; drawing the passage")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = Tokenizer(args.model)
    passage = tok.encode(chapters[1])[: args.passage_tokens]
    draw_passage(model, tok, passage, args.png,
                 "Trained demo model: first-choice expert of each token of Jonah 2 (held out), per layer")
    after = os.getloadavg()
    progress(f"load average after: {after[0]:.1f} {after[1]:.1f} {after[2]:.1f}")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    rows = []
    for name, layers in results.items():
        for n, s in enumerate(layers):
            rows.append([name, n, f"{s['entropy']:.3f}", f"{s['hot_over_mean']:.2f}",
                         f"{pct(s['prev_in_top2'])} ({pct(s['prev_in_top2_shuffled'])})",
                         f"{pct(s['first_repeat'])} ({pct(s['first_repeat_shuffled'])})",
                         pct(s.get("recall_1")), pct(s.get("recall_2"))])
    trained, random_ = results["trained"], results["random (init-demo --random)"]

    def mean(layers: list[dict[str, float]], key: str) -> float:
        values = [s[key] for s in layers if key in s]
        return sum(values) / len(values)

    png = args.png.relative_to(ROOT) if args.png.is_relative_to(ROOT) else args.png
    body = "\n".join([
        f"Held-out text: Jonah (4 chapters, one forward pass each, <s> first, at most {args.max_tokens} tokens), "
        "routing read from `transformers`' MixtralForCausalLM through forward hooks. Entropy in bits of each "
        "layer's routed rows over its 8 experts (3.000: perfectly even). *Previous in top-2*: the previous token's "
        "first-choice expert is one of this token's two (chance 25%); *first repeats*: the same first choice "
        "(chance 12.5%); in brackets the same measure on randomly paired tokens of the same layer. *Next-layer "
        "guess*: recall of layer l's two experts guessed by applying layer l's router (its RMSNorm and gate) to "
        "layer l-1's output (l-2's for 2 ahead; chance 25%). The random demo (same architecture at hidden size 128, "
        "its own 1,024-token tokenizer, so more tokens for the same text) is written by `init_demo` with seed 0.",
        "",
        table(["model", "layer", "entropy (bits)", "hottest / mean", "previous in top-2 (random pairs)",
               "first repeats (random pairs)", "next-layer guess, 1 ahead", "2 ahead"], rows),
        "",
        f"- trained: a token's two experts include the previous token's first choice "
        f"{pct(mean(trained, 'prev_in_top2'))} of the time, against {pct(mean(trained, 'prev_in_top2_shuffled'))} "
        f"for random pairs of tokens (chance 25%; up to {pct(max(s['prev_in_top2'] for s in trained))} in one "
        f"layer); random weights: {pct(mean(random_, 'prev_in_top2'))} against "
        f"{pct(mean(random_, 'prev_in_top2_shuffled'))} (its routers pile onto few experts, not onto neighbours)",
        f"- trained: the next layer's router on this layer's output guesses "
        f"{pct(mean(trained, 'recall_1'))} of its experts (2 ahead: {pct(mean(trained, 'recall_2'))}; chance 25%); "
        f"random weights: {pct(mean(random_, 'recall_1'))} ({pct(mean(random_, 'recall_2'))})",
        "",
        f"![routing of one passage]({png.relative_to('docs') if str(png).startswith('docs/') else png})",
        "",
        f"Machine: {machine()}. Load average {before[0]:.1f} before, {after[0]:.1f} after (shared machine; no "
        "timings here). Command: `python -m bench.routing`",
    ])
    print(body)
    if not args.no_write:
        write_section("routing", "Routing on held-out text (trained vs random demo)", body)


if __name__ == "__main__":
    main()
