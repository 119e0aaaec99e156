"""What does a CJS adapter predict on Decima decisions it has not seen? Teacher-forced
per-head metrics on a held-out pool: cross-entropy and accuracy of the stage head and of
the executor-limit head, and the bias of the arg-max executor limit against the logged
one (mean, and how often it is larger or smaller). An adapter whose arg-max limit is
larger than Decima's most of the time hands out more executors per decision and makes
fewer decisions per episode; sampling from its heads (``netllm eval cjs --decode
sample``) does not have that bias.

    NETLLM_DATA=../shared/data .venv/bin/python benchmarks/cjs_heads.py \\
        --pool runs/pool-cjs-heldout runs/cjs-long runs/cjs-best [--batches 12] [--out runs/cjs-heads.json]

The pool should come from job sequences none of the adapters was trained on (e.g.
``netllm collect cjs --policy decima --seeds 149-152 --out runs/pool-cjs-heldout``).
Windows (batches of 32 x K decisions) are drawn with a fixed seed, so every adapter is
scored on the same decisions; the bias is measured on each window's last decision.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from netllm.model import NetLLM
from netllm.rl import decision_hidden
from netllm.utils import torch_threads
from netllm.tasks.cjs.policy import CJSWindowSampler, cjs_loss, head_logits
from netllm.tasks.cjs.pool import load_pool
from netllm.utils import atomic_write_json


@torch.no_grad()
def head_metrics(folder: Path, pool_path: Path, batches: int = 12, batch_size: int = 32) -> dict[str, float]:
    pool = load_pool(pool_path)
    model = NetLLM.from_adapter(folder, task="cjs", device="cpu").eval()
    sampler = CJSWindowSampler(pool, model.config.rl, batch_size=batch_size, seed=123)
    sums: dict[str, list[float]] = {}
    predicted, logged = [], []
    for i in range(batches):
        batch = sampler.batch(i)
        _, metrics = cjs_loss(model, batch)
        for k, v in metrics.items():
            if k != "tokens":
                sums.setdefault(k, []).append(v)
        hidden = decision_hidden(model, batch.window)[:, -1]
        cand, stage = batch.candidates[:, -1], batch.stage[:, -1]
        rows = torch.arange(len(stage))
        caps = batch.cand_caps[:, -1][rows, stage]
        _, exec_logits = head_logits(model, hidden, cand, batch.cand_mask[:, -1], cand[rows, stage], caps)
        assert exec_logits is not None
        predicted.append(exec_logits.argmax(-1) + 1)
        logged.append(torch.minimum(batch.num_exec[:, -1], caps.clamp(1, exec_logits.shape[-1])))
    p, q = torch.cat(predicted).float(), torch.cat(logged).float()
    out = {k: float(np.mean(v)) for k, v in sums.items()}
    out.update(argmax_limit_mean=p.mean().item(), logged_limit_mean=q.mean().item(),
               argmax_larger=(p > q).float().mean().item(), argmax_smaller=(p < q).float().mean().item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", nargs="+", type=Path, help="adapter folders")
    parser.add_argument("--pool", type=Path, required=True, help="held-out CJS pool (netllm collect cjs)")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("runs/cjs-heads.json"))
    args = parser.parse_args()
    results = {}
    with torch_threads(1):
        for folder in args.adapters:
            results[str(folder)] = head_metrics(folder, args.pool, args.batches)
            print(folder, {k: round(v, 3) for k, v in results[str(folder)].items()}, flush=True)
    atomic_write_json(args.out, results)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
