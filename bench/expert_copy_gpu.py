"""What a GPU changes for the expert cache (issue 23): the time to copy one expert from pinned host memory to the
device (a cache miss, or a prefetch) against the time that expert's SwiGLU takes on 1 and 32 rows (what a load
must hide behind). torch only, no Ray; under a minute; prints a markdown table.

A miss costs copy time; a prefetch hides it only if it starts at least that long before the expert's rows come,
which is about one layer of attention plus the layer's own experts. Sizes: the trained demo, the bench model
(bench/models.py) and Mixtral-8x7B (hidden 4096, intermediate 14336), in bfloat16.

    python -m bench.expert_copy_gpu [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from cluster.model.ops import expert_swiglu

SIZES = {"demo": (256, 512), "bench": (512, 1408), "Mixtral-8x7B": (4096, 14336)}  # (hidden H, intermediate I)


def cuda_ms(fn: object, repeats: int) -> float:
    """Median milliseconds of ``fn()`` on the current stream, timed with CUDA events (after one warm-up)."""
    assert callable(fn)
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/expert_copy_gpu.py needs CUDA (torch.cuda.is_available() is False): nothing measured.")
        sys.exit(0)
    started = time.perf_counter()
    device = torch.device("cuda", 0)
    dtype = torch.bfloat16
    rows = []
    for name, (h, i) in SIZES.items():
        host13 = torch.randn(2 * i, h).to(dtype).pin_memory()  # (2I, H): w1 and w3 fused, as in a slot
        host2 = torch.randn(h, i).to(dtype).pin_memory()  # (H, I)
        slot13 = torch.empty_like(host13, device=device)
        slot2 = torch.empty_like(host2, device=device)
        nbytes = host13.numel() * 2 + host2.numel() * 2

        def copy(slot13: torch.Tensor = slot13, slot2: torch.Tensor = slot2, host13: torch.Tensor = host13,
                 host2: torch.Tensor = host2) -> None:
            slot13.copy_(host13, non_blocking=True)
            slot2.copy_(host2, non_blocking=True)

        copy_ms = cuda_ms(copy, args.repeats)
        compute = []
        for n in (1, 32):
            x = torch.randn(n, h, device=device, dtype=dtype) * 0.1
            compute.append(cuda_ms(lambda x=x, w13=slot13, w2=slot2: expert_swiglu(x, w13, w2), args.repeats))
        rows.append([name, f"{h} / {i}", f"{nbytes / 2**20:.1f}", f"{copy_ms:.3f}", f"{nbytes / copy_ms / 1e6:.1f}",
                     f"{compute[0]:.3f}", f"{compute[1]:.3f}", f"{copy_ms / compute[0]:.0f}x",
                     f"{copy_ms / compute[1]:.0f}x"])
        del host13, host2, slot13, slot2
        torch.cuda.empty_cache()
    headers = ["expert", "H / I", "MiB (bf16)", "pinned H2D copy ms", "GB/s", "SwiGLU ms, 1 row", "SwiGLU ms, 32 rows",
               "copy / compute (1)", "copy / compute (32)"]
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nDevice: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; median of {args.repeats} "
          f"(CUDA events); {time.perf_counter() - started:.1f} s in all.")


if __name__ == "__main__":
    main()
