"""How does the way a scheduler decodes its two heads change its JCT? Decima itself, the
policy the NetLLM scheduler imitates, with a temperature per head: the stage choice
sampled from softmax(logits / Ts), the executor limit from softmax(logits / Tl); T = 0
is the arg-max, (1, 1) is upstream's Decima. A decoding that helps Decima helps a
faithful copy of it in the same way, so this tells which ``--decode`` to try on an
adapter — and the same decoding has to be reported for Decima beside it.

    NETLLM_DATA=../shared/data .venv/bin/python benchmarks/cjs_decoding.py \\
        --seeds 1001-1010 --decodings 1:1,0.5:1,1:0.5,0.5:0.5,0:1 [--out runs/cjs-decoding.json]

Run it on validation seeds (not the test seeds 1-10) when it picks a decoding.
Upstream's Decima draws its samples from the simulator's stream; so do these.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from netllm.tasks.cjs.baselines import DecimaScheduler, run_episode
from netllm.tasks.cjs.jobs import load_all
from netllm.tasks.cjs.sim import CJSAction, CJSConfig, CJSEnv, CJSObservation
from netllm.utils import NetLLMError, atomic_write_json, parse_seeds


class TemperedDecima(DecimaScheduler):
    """Pretrained Decima with a temperature on each head (0: arg-max)."""

    def __init__(self, stage_t: float, limit_t: float) -> None:
        super().__init__()
        self.stage_t, self.limit_t = stage_t, limit_t
        self.name = f"decima-t{stage_t:g}:{limit_t:g}"

    def _pick(self, logits: torch.Tensor, t: float, rng) -> int:
        if t == 0:
            return int(torch.argmax(logits))
        pi = torch.softmax(logits / t, 0).numpy()
        return rng.choices(range(pi.size), pi)[0]

    def _decide(self, obs: CJSObservation, h, h_dag, h_glob, rng) -> CJSAction:
        stage_idx = self._pick(self.net.stage_logits(obs, h, h_dag, h_glob), self.stage_t, rng)
        job_idx = int(obs.node_job[obs.runnable[stage_idx]])
        limit = self._pick(self.net.exec_logits(obs, job_idx, h_dag, h_glob), self.limit_t, rng)
        return CJSAction(int(stage_idx), limit + 1)


def parse_decodings(text: str) -> list[tuple[float, float]]:
    out = []
    for part in text.split(","):
        try:
            ts, tl = (float(x) for x in part.split(":"))
        except ValueError:
            raise NetLLMError(f"--decodings: 'Ts:Tl' pairs, got {part!r}") from None
        if ts < 0 or tl < 0:
            raise NetLLMError(f"--decodings: temperatures are >= 0, got {part!r}")
        out.append((ts, tl))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1001-1010")
    ap.add_argument("--decodings", default="1:1,0.5:1,1:0.5,0.5:0.5,0:1")
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--executors", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    seeds, decodings = parse_seeds(args.seeds), parse_decodings(args.decodings)
    config = CJSConfig(num_jobs=args.jobs, num_executors=args.executors)
    load_all()
    report = {}
    for ts, tl in decodings:
        policy = TemperedDecima(ts, tl)
        t0 = time.perf_counter()
        runs = [run_episode(CJSEnv.from_config(config), policy, seed=s) for s in seeds]
        jct = [r.avg_jct_s for r in runs]
        report[policy.name] = {"mean": float(np.mean(jct)), "per_seed": jct,
                               "decisions_per_episode": float(np.mean([r.num_decisions for r in runs])),
                               "wall_s": time.perf_counter() - t0}
        print(f"{policy.name}: mean JCT {np.mean(jct):.2f} s  ({', '.join(f'{x:.1f}' for x in jct)}), "
              f"{report[policy.name]['decisions_per_episode']:.0f} decisions/episode", flush=True)
    if args.out:
        atomic_write_json(args.out, {"seeds": seeds, "jobs": args.jobs, "executors": args.executors,
                                     "decodings": report})


if __name__ == "__main__":
    main()
