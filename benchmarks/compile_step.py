"""torch.compile of the backbone: what it does to one LoRA training step, side by side.

    python benchmarks/compile_step.py --layers 4 --batch 16 --tokens 30 [--device cuda --precision bf16]

The step is the foundation bench's (``netllm.bench.lora_train_step``: forward, backward and
AdamW on random embeddings). It is timed eagerly, then the backbone's decoder is wrapped
in ``torch.compile`` (default inductor backend) and the same step is timed again in the
same process: the ratio is the speed-up. The compile time (first compiled step) is
reported on its own. Before the compiled steps are timed, the compiled and the eager
decoder (LoRA dropout off) run one forward pass on the same input and the largest
difference of their hidden states is reported: a speed-up with other outputs would not
count.

This is the first lever docs/scale-out.md names for the GPU, where a step is bound by the
host's kernel launches; on a CPU the step is compute, and the gain is small.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from netllm.bench import _timed, lora_train_step
from netllm.utils import atomic_write_json


def mean_step_s(step, repeats: int) -> float:
    """Mean seconds of ``repeats`` steps after two warm-up steps (the foundation bench's timer)."""
    _timed(step, 2)
    return sum(_timed(step, repeats)) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--precision", choices=("no", "bf16"), default="no")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, help="JSON file for the numbers")
    args = ap.parse_args()

    bb, step = lora_train_step(args.llm, args.device, args.layers, args.batch, args.tokens,
                               precision=args.precision)
    eager_s = mean_step_s(step, args.repeats)

    x = torch.randn(2, args.tokens, bb.hidden_size, device=bb.device)
    mask = torch.ones(2, args.tokens, dtype=torch.long, device=bb.device)
    object.__setattr__(bb, "_transformer", torch.compile(bb._transformer))
    start = time.perf_counter()
    step()
    compile_s = time.perf_counter() - start
    bb.eval()  # no LoRA dropout: both passes must compute the same function
    with torch.no_grad(), torch.autocast(bb.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        compiled = bb(x, mask)[0].float()
        eager = bb._transformer._orig_mod(inputs_embeds=x.to(bb.dtype), attention_mask=mask).last_hidden_state.float()
    bb.train()
    compiled_s = mean_step_s(step, args.repeats)

    tokens = args.batch * args.tokens
    result = {
        "llm": args.llm, "device": args.device, "layers": args.layers, "batch": args.batch,
        "tokens": args.tokens, "precision": args.precision, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "eager_ms": 1000 * eager_s, "compiled_ms": 1000 * compiled_s, "compile_s": compile_s,
        "eager_tokens_per_s": tokens / eager_s, "compiled_tokens_per_s": tokens / compiled_s,
        "speedup": eager_s / compiled_s,
        "max_abs_diff_hidden": float((compiled - eager).abs().max()),
        "reference_scale": float(eager.abs().max()),
    }
    print(f"{args.layers} layers, {args.batch} x {args.tokens} tokens, {args.precision}, {args.device}: "
          f"eager {result['eager_ms']:.1f} ms, compiled {result['compiled_ms']:.1f} ms "
          f"({result['speedup']:.2f}x; compiling took {compile_s:.1f} s); "
          f"hidden states differ by at most {result['max_abs_diff_hidden']:.2e} "
          f"(largest value {result['reference_scale']:.1f})")
    if args.out:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
