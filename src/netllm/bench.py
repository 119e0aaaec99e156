"""Foundation benchmark: backbone load time, LoRA training throughput, decision latency.

    netllm bench foundation [--llm smollm2] [--device auto] [--dtype auto] [--batch 8] [--tokens 160]
                            [--peak-tflops X] [--out runs/bench-foundation]

Measures, side by side in one run:
  * load time of the backbone: first load (an empty model cache, GGUF dequantised)
    and cached load (safetensors from the user cache);
  * training tokens/s of one LoRA step (forward + backward + AdamW) at batch 8 x 160
    tokens (``--batch``, ``--tokens``) with all decoder layers and with 6 layers, in fp32
    or with bf16 autocast (``--dtype``; CUDA, or a CPU with AMX), and its model FLOP utilisation: the FLOPs
    the step executes (counted by ``torch.utils.flop_counter`` on one step: matrix
    products and attention, forward and backward — frozen weights get no weight
    gradient, so a LoRA step is ~4 FLOPs per parameter and token, not 6) per second,
    against the device's peak (``--peak-tflops``; known for common NVIDIA GPUs in
    ``PEAK_TFLOPS``, dense bf16 tensor cores);
  * decision latency of the return-conditioned policy: KV-cached incremental step vs
    recomputing the whole context, with the same model and the same context.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from netllm.backbone import LoraSpec, load_backbone, resolve_dtype
from netllm.encoders import EncoderSpec
from netllm.heads import HeadSpec
from netllm.model import NetLLM, NetLLMConfig
from netllm.rl import IncrementalPolicy, RLSpec
from netllm.utils import atomic_write_json, prepare_run_dir, resolve_device, seed_everything

console = Console()


# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets;
# matched against torch.cuda.get_device_name() in this order
PEAK_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.1),
               ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.2), ("V100", 125.0))


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The device's dense bf16 peak if known (fp32 training has no tensor-core peak here)."""
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in PEAK_TFLOPS if key in name), None)


def _timed(fn: Any, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def measure_load(llm: str, device: str) -> dict[str, float]:
    """First load into an empty cache, then the cached load."""
    old = os.environ.get("NETLLM_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["NETLLM_CACHE"] = cache
        try:
            t0 = time.perf_counter()
            load_backbone(llm, lora=None, device=device)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            bb = load_backbone(llm, lora=None, device=device)
            cached = time.perf_counter() - t0
        finally:
            if old is None:
                os.environ.pop("NETLLM_CACHE", None)
            else:
                os.environ["NETLLM_CACHE"] = old
    return {"load_first_s": first, "load_cached_s": cached, "cache_hit": float(bb.report.from_cache)}


def lora_train_step(llm: str, device: str, layers: int | None = None, batch: int = 8, tokens: int = 160,
                    rank: int = 16, precision: str = "no") -> tuple[Any, Callable[[], None]]:
    """A backbone with LoRA r = ``rank`` in training mode and ``step()``: one full AdamW
    step on random embeddings of batch x tokens; ``precision`` "bf16": frozen weights in
    bf16 and autocast, as ``netllm adapt --dtype bf16`` trains. The step the foundation
    bench times and ``benchmarks/gpu_profile_step.py`` profiles."""
    from netllm.recipe import set_precision

    seed_everything(0)
    bb = load_backbone(llm, layers=layers, lora=LoraSpec(rank=rank), device=device)
    set_precision(bb, precision)
    bb.train()
    opt = torch.optim.AdamW([p for p in bb.parameters() if p.requires_grad], lr=1e-4)
    dev = bb.device
    x = torch.randn(batch, tokens, bb.hidden_size, device=dev)
    mask = torch.ones(batch, tokens, dtype=torch.long, device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            hidden, _ = bb(x, mask)
        hidden.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return bb, step


def measure_train_step(llm: str, device: str, layers: int | None, repeats: int,
                       batch: int = 8, tokens: int = 160, rank: int = 16, precision: str = "no",
                       peak: float | None = None) -> dict[str, Any]:
    """Tokens/s and model FLOP utilisation of full LoRA training steps (``lora_train_step``)."""
    from torch.utils.flop_counter import FlopCounterMode

    bb, step = lora_train_step(llm, device, layers, batch, tokens, rank, precision)

    # Counted with eager attention, whose matrix products the counter sees: it does not
    # count CPU sdpa kernels and rejects grouped KV heads in the CUDA ones. Timed with the
    # backbone's own attention after one warm-up step of it.
    config = bb.config
    attention = config._attn_implementation
    counter = FlopCounterMode(display=False)
    try:
        config._attn_implementation = "eager"
        with counter:
            step()
    finally:
        config._attn_implementation = attention
    flops = float(counter.get_total_flops())
    step()
    times = _timed(step, repeats)
    timed_attention = config._attn_implementation
    median = statistics.median(times)
    # the frozen weights a token multiplies: neither embedding tables nor the (unused) LM head
    head = getattr(bb.llm, "get_output_embeddings", lambda: None)()
    skip = {id(m.weight) for m in bb.modules() if isinstance(m, torch.nn.Embedding) or m is head}
    frozen = sum(p.numel() for p in bb.parameters() if not p.requires_grad and id(p) not in skip)
    achieved = flops / median / 1e12
    return {"layers": bb.num_layers, "batch": batch, "tokens": tokens, "precision": precision,
            "attention": timed_attention, "step_s": median, "tokens_per_s": batch * tokens / median,
            "flops_per_step": flops, "flops_per_token_per_weight": flops / (batch * tokens) / max(frozen, 1),
            "tflops_per_s": achieved, "peak_tflops": peak, "mfu": achieved / peak if peak else None}


def measure_decisions(llm: str, device: str, layers: int | None, context: int, repeats: int,
                      episode_steps: int = 48, batch: int = 1, dtype: str = "fp32") -> dict[str, float]:
    """Per-decision latency over an episode of ``batch`` environments deciding together,
    as evaluation runs it (LoRA merged, the LLM in ``dtype`` as ``eval --dtype``): KV-cached
    incremental vs full recompute. The cached episode re-primes every ``context - context
    // 2`` steps; the steady-state step (``cached_step_ms``, no re-prime) is reported too."""
    seed_everything(0)
    config = NetLLMConfig(
        task="bench",
        llm=llm,
        layers=layers,
        lora=LoraSpec(rank=16),
        encoders=[EncoderSpec("throughput_mbps", "series", length=8),
                  EncoderSpec("download_s", "series", length=8),
                  EncoderSpec("chunk_sizes_mb", "series", length=6),
                  EncoderSpec("buffer_s", "scalar", in_dim=1),
                  EncoderSpec("last_level", "scalar", in_dim=1),
                  EncoderSpec("chunks_left", "scalar", in_dim=1)],
        heads={"action": HeadSpec("categorical", num_classes=6)},
        rl=RLSpec(state_modalities=("throughput_mbps", "download_s", "chunk_sizes_mb", "buffer_s",
                                    "last_level", "chunks_left"),
                  context_steps=context, num_actions=6, max_timestep=128),
    )
    model = NetLLM(config, device=device).eval()
    model.backbone.merge_lora()
    if dtype != "fp32":
        model.backbone.cast(resolve_dtype(dtype, model.device))
    gen = torch.Generator().manual_seed(0)
    sizes = {"throughput_mbps": 8, "download_s": 8, "chunk_sizes_mb": 6, "buffer_s": 1, "last_level": 1,
             "chunks_left": 1}
    states = [{k: torch.rand(batch, n, generator=gen).to(model.device) for k, n in sizes.items()}
              for _ in range(episode_steps)]
    step_times: list[float] = []

    def episode(incremental: bool) -> None:
        policy = IncrementalPolicy(model, target=40.0, batch_size=batch, use_cache=incremental)
        for s in states:
            reprime = incremental and len(policy.steps[0]) >= context
            t0 = time.perf_counter()
            hidden = policy.decide(s)
            if incremental and policy.steps[0] and len(policy.steps[0]) > 1 and not reprime:
                step_times.append(time.perf_counter() - t0)
            action = model.heads["action"](hidden).argmax(-1)
            policy.record(action, 0.5)

    episode(True)
    episode(False)  # warm-up both paths
    step_times.clear()
    inc = statistics.median(_timed(lambda: episode(True), repeats)) / episode_steps
    full = statistics.median(_timed(lambda: episode(False), repeats)) / episode_steps
    return {"layers": model.backbone.num_layers, "context_steps": context, "batch": batch,
            "incremental_ms": inc * 1e3, "full_recompute_ms": full * 1e3, "speedup": full / inc,
            "cached_step_ms": statistics.median(step_times) * 1e3,
            "per_env_incremental_ms": inc * 1e3 / batch}


def run_foundation_bench(llm: str = "smollm2", device: str = "auto", out: str | Path = "runs/bench-foundation",
                         repeats: int = 3, context: int = 10, dtype: str = "auto", batch: int = 8,
                         tokens: int = 160, peak: float | None = None) -> dict[str, Any]:
    from netllm.recipe import training_precision

    dev = resolve_device(device)
    precision = training_precision(dtype, dev)  # --dtype bf16 without native bf16: one line, before any file
    peak = peak if peak is not None else peak_tflops(dev, precision)
    out = prepare_run_dir(out, {"command": "bench foundation", "llm": llm, "device": str(dev),
                                "repeats": repeats, "context": context, "dtype": dtype, "batch": batch,
                                "tokens": tokens, "peak_tflops": peak})
    results: dict[str, Any] = {"device": str(dev), "threads": torch.get_num_threads(), "precision": precision,
                               "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    console.print(f"[bold]foundation benchmark[/bold] llm={llm} device={dev} threads={torch.get_num_threads()}")
    results["load"] = measure_load(llm, device)
    console.print(f"load: first {results['load']['load_first_s']:.1f} s, cached {results['load']['load_cached_s']:.2f} s")
    results["train"] = []
    for layers in (None, 6):
        r = measure_train_step(llm, device, layers, repeats, batch=batch, tokens=tokens, precision=precision,
                               peak=peak)
        results["train"].append(r)
        console.print(f"train step, {r['layers']} layers: {r['tokens_per_s']:.0f} tokens/s, "
                      f"{r['tflops_per_s']:.3f} TFLOP/s" + (f" (MFU {r['mfu']:.1%})" if r["mfu"] else ""))
    results["decide"] = []
    for layers in (None, 4):
        for envs in (1, 16):  # 16 environments deciding together: fewer steps, it is slow without the cache
            r = measure_decisions(llm, device, layers, context, repeats if envs == 1 else 1,
                                  episode_steps=48 if envs == 1 else 20, batch=envs)
            results["decide"].append(r)
            console.print(f"decision, {r['layers']} layers, batch {envs}: incremental {r['incremental_ms']:.1f} ms "
                          f"(steady step {r['cached_step_ms']:.1f} ms), full {r['full_recompute_ms']:.1f} ms")
    atomic_write_json(out / "bench.json", results)

    table = Table(title=f"NetLLM foundation benchmark ({llm}, {dev})")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_row("backbone load, first (GGUF dequantise)", f"{results['load']['load_first_s']:.1f} s")
    table.add_row("backbone load, cached", f"{results['load']['load_cached_s']:.2f} s")
    for r in results["train"]:
        mfu = f", MFU {r['mfu']:.1%} of {r['peak_tflops']:.0f}" if r["mfu"] else ""
        table.add_row(f"LoRA train step {r['batch']}x{r['tokens']} tokens ({precision}), {r['layers']} layers",
                      f"{r['tokens_per_s']:.0f} tokens/s, {r['tflops_per_s']:.3f} TFLOP/s{mfu}")
    for r in results["decide"]:
        table.add_row(f"decision K={r['context_steps']}, {r['layers']} layers, batch {r['batch']}: "
                      "KV cache (steady step) / full",
                      f"{r['incremental_ms']:.1f} ({r['cached_step_ms']:.1f}) / {r['full_recompute_ms']:.1f} ms "
                      f"({r['speedup']:.1f}x)")
    console.print(table)
    console.print(f"written: {out / 'bench.json'}")
    return results
