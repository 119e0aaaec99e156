"""NetLLM: adapt a pretrained LLM to networking tasks.

The data flow follows the modules: ``backbone`` (frozen LLM + LoRA) <- ``encoders``
(networking data -> token embeddings) -> ``heads`` (hidden states -> valid answers),
wired in ``model``; ``rl`` turns logged experience into return-conditioned training
windows; ``train`` is the one training loop; ``data`` finds and fetches data sets;
``tasks/`` holds the use cases.
"""

from netllm.utils import NetLLMError, seed_everything

__version__ = "0.1.0"
__all__ = ["NetLLMError", "seed_everything", "__version__"]
