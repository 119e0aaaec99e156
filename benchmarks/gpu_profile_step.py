"""Where one 30-layer LoRA training step's time goes (issue 17): host or device.

    PYTHONPATH=src python3 benchmarks/gpu_profile_step.py --device cuda

SmolLM2-135M's architecture with random weights (``gpu_foundation.smollm2_shaped``),
LoRA r = 16, AdamW; two shapes: the CPU benchmark's 8 x 160 tokens in fp32, and the ABR
recipe's micro-batch (16 windows of K = 10 steps x 3 tokens = 30 tokens) in bf16
autocast. For each: milliseconds per step with the device synchronised once per 10
steps, the time the host needs to enqueue them, and one step under ``torch.profiler``
(top operators by host time, the device-busy total, kernels launched). A step whose device
time is a small part of its wall time is bound by the host (Python, dispatch, kernel
launches), and more tokens per step, fewer kernels (fused optimizer, CUDA graphs,
``torch.compile``) are the levers, not faster kernels.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def profile_shape(llm: str, dev: torch.device, batch: int, tokens: int, precision: str) -> None:
    """Time and profile training steps of one shape (prints the results)."""
    from netllm.bench import lora_train_step

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    _, step = lora_train_step(llm, str(dev), batch=batch, tokens=tokens, precision=precision)

    for _ in range(3):
        step()
    sync()
    n = 10
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    enqueue = (time.perf_counter() - t0) / n
    sync()
    wall = (time.perf_counter() - t0) / n
    print(f"{batch}x{tokens} {precision}: {wall * 1e3:.1f} ms/step ({enqueue * 1e3:.1f} ms to enqueue)", flush=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    # the table's footer gives the device-busy time ("Self CUDA time total")
    print(f"kernels launched: {sum(e.count for e in events if e.key in LAUNCHES)}", flush=True)


def main() -> None:
    from gpu_foundation import smollm2_shaped

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", type=int, default=2, help="profile the first N shapes (1 or 2)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        llm = smollm2_shaped(Path(tmp) / "smollm2-135m-random")
        for batch, tokens, precision in ((8, 160, "no"), (16, 30, "bf16"))[: args.shapes]:
            if precision == "bf16" and dev.type != "cuda":
                continue
            profile_shape(llm, dev, batch, tokens, precision)
            if dev.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
