"""NetLLM: adapt a pretrained LLM to networking tasks.

The data flow follows the modules: ``backbone`` (frozen LLM + LoRA) <- ``encoders``
(networking data -> token embeddings) -> ``heads`` (hidden states -> valid answers),
wired in ``model``; ``rl`` turns logged experience into return-conditioned training
windows; ``train`` is the one training loop; ``data`` finds and fetches data sets;
``tasks/`` holds the use cases.
"""

import os

# Small per-decision matrix products (baseline actors, simulators) slow down ~100x when
# OpenBLAS spreads them over busy cores; one BLAS thread is faster here. Set before
# numpy is first imported; a user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# torch's OpenMP threads spin at every barrier. When another process holds a core, the
# spinning thread waits for a descheduled partner and a LoRA step gets ~10x slower
# (benchmarks/omp_contention.py: 9.4 s vs 0.8 s per VP step on 2 busy cores).
# Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from netllm.utils import NetLLMError, seed_everything  # noqa: E402

__version__ = "0.1.0"
__all__ = ["NetLLMError", "seed_everything", "__version__"]
