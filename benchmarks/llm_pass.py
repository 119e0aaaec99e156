"""What one pass of the frozen LLM costs on this machine, by tokens, batch and dtype:
the floor under a decision's latency (``netllm bench foundation`` times whole decisions).

    NETLLM_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llm_pass.py [--layers 30]

For float32 and bfloat16 weights (bf16 is fast only on CPUs with AMX / AVX512-BF16):
batch 1 with 1, 5, 9 and 47 tokens, batch 16 with 5 and 9 tokens, and 9 tokens with LoRA
merged into the weights (as evaluation loads an adapter). Median of 8 passes, one thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from netllm.backbone import LoraSpec
from netllm.encoders import EncoderSpec
from netllm.heads import HeadSpec
from netllm.model import NetLLM, NetLLMConfig


def median_ms(fn, repeats: int = 8) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for dtype in ("float32", "bfloat16"):
        config = NetLLMConfig(task="bench", llm="smollm2", layers=args.layers, lora=LoraSpec(rank=16),
                              encoders=[EncoderSpec("x", "scalar", in_dim=4)],
                              heads={"action": HeadSpec("categorical", num_classes=6)})
        backbone = NetLLM(config, device="cpu", dtype=dtype).eval().backbone
        with torch.no_grad():
            for batch, tokens in ((1, 1), (1, 5), (1, 9), (1, 47), (16, 5), (16, 9)):
                x = torch.randn(batch, tokens, backbone.hidden_size)
                mask = torch.ones(batch, tokens, dtype=torch.long)
                print(f"{dtype} {args.layers} layers, batch {batch} x {tokens} tokens: "
                      f"{median_ms(lambda: backbone(x, mask)):.1f} ms", flush=True)
            backbone.merge_lora()
            x = torch.randn(1, 9, backbone.hidden_size)
            mask = torch.ones(1, 9, dtype=torch.long)
            print(f"{dtype} {args.layers} layers, LoRA merged, batch 1 x 9 tokens: "
                  f"{median_ms(lambda: backbone(x, mask)):.1f} ms", flush=True)


if __name__ == "__main__":
    main()
