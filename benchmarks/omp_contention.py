"""Time one LoRA training step while other processes keep both cores busy, under three
torch threading settings, each in a fresh interpreter (OpenMP reads its settings once).

    NETLLM_DATA=../shared/data .venv/bin/python benchmarks/omp_contention.py

The step is the VP model's (SmolLM2 cut to 6 layers, LoRA r=32, batch 32 x 10 tokens).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys

STEP = r"""
import json, os, sys, time
import torch
if os.environ.get("THREADS"):
    torch.set_num_threads(int(os.environ["THREADS"]))
from netllm.tasks.vp.dataset import load_samples
from netllm.tasks.vp.task import batches, build_model, model_config, vp_loss
model = build_model(model_config(layers=6, rank=32), device="cpu")
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
get_batch = batches(load_samples("Jin2022", "train"), 32, 0)
times = []
for i in range(6):
    t = time.perf_counter()
    loss, _ = vp_loss(model, get_batch(i)); opt.zero_grad(); loss.backward(); opt.step()
    times.append(time.perf_counter() - t)
print(json.dumps(sorted(times[1:])[len(times[1:]) // 2]))
"""

# torch is imported BEFORE netllm here, so netllm's own default does not apply.
SETTINGS = {
    "2 threads, OpenMP defaults": {},
    "1 thread": {"THREADS": "1"},
    "2 threads, OMP_WAIT_POLICY=PASSIVE (netllm's default)": {"OMP_WAIT_POLICY": "PASSIVE", "THREADS": "2"},
}


def _busy() -> None:
    while True:
        pass


def main() -> None:
    competitors = [mp.Process(target=_busy, daemon=True) for _ in range(os.cpu_count() or 2)]
    for c in competitors:
        c.start()
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    try:
        for name, env in SETTINGS.items():
            out = subprocess.run([sys.executable, "-c", STEP], env={**base, **env},
                                 capture_output=True, text=True, check=True)
            print(f"{name}: {json.loads(out.stdout.strip().splitlines()[-1]):.2f} s per step (median)")
    finally:
        for c in competitors:
            c.terminate()


if __name__ == "__main__":
    main()
