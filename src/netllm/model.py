"""NetLLM = modality encoders -> frozen LLM (+LoRA) -> networking heads.

A task declares its encoders and heads in a :class:`NetLLMConfig`; the model embeds
each modality into token-like vectors, runs the LLM on them as ``inputs_embeds`` and
decodes the hidden state of the last real token with each head in ONE pass.

A trained adapter is a folder (never the base LLM, never pickle):

    adapter_config.json         task, backbone spec, layers, LoRA, encoder/head specs,
                                normalisation constants, library versions, git revision
    adapter_model.safetensors   LoRA weights in peft's key format
    netllm_modules.safetensors  encoders + heads (+ return/time/action embeddings)
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from netllm.backbone import DEFAULT_LLM, Backbone, LoraSpec, current_inference_precision, load_backbone, resolve_dtype
from netllm.encoders import EncoderSpec, ModalityEncoders
from netllm.heads import HeadSpec, build_head
from netllm.utils import NetLLMError, atomic_path, atomic_write_text, provenance, resolve_device, strict_json_dumps

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"
MODULE_WEIGHTS = "netllm_modules.safetensors"
FORMAT_VERSION = 1


@dataclass
class NetLLMConfig:
    """Everything needed to rebuild a NetLLM model around a backbone."""

    task: str
    encoders: list[EncoderSpec]
    heads: dict[str, HeadSpec]
    llm: str = DEFAULT_LLM
    layers: int | None = None  # keep the first N decoder layers (None = all)
    lora: LoraSpec = field(default_factory=LoraSpec)
    pretrained: bool = True  # False = same architecture, random weights (ablation)
    seed: int = 0  # seeds the random weights when pretrained=False
    rl: Any = None  # netllm.rl.RLSpec for decision tasks
    norm: dict[str, Any] = field(default_factory=dict)  # task normalisation constants

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "llm": self.llm,
            "layers": self.layers,
            "lora": self.lora.to_dict(),
            "pretrained": self.pretrained,
            "seed": self.seed,
            "encoders": [_spec_to_json(s) for s in self.encoders],
            "heads": {k: _spec_to_json(v) for k, v in self.heads.items()},
            "rl": _spec_to_json(self.rl) if self.rl is not None else None,
            "norm": self.norm,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NetLLMConfig":
        from netllm.rl import RLSpec

        return cls(
            task=d["task"],
            llm=d["llm"],
            layers=d.get("layers"),
            lora=LoraSpec.from_dict(d["lora"]),
            pretrained=bool(d.get("pretrained", True)),
            seed=int(d.get("seed", 0)),
            encoders=[_spec_from_json(EncoderSpec, s) for s in d["encoders"]],
            heads={k: _spec_from_json(HeadSpec, v) for k, v in d["heads"].items()},
            rl=_spec_from_json(RLSpec, d["rl"]) if d.get("rl") else None,
            norm=d.get("norm", {}),
        )


def _spec_to_json(spec: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(spec):
        value = getattr(spec, f.name)
        if hasattr(value, "to_dict") and not isinstance(value, dict):  # a transformers config
            value = {"model_type": value.model_type, **value.to_dict()}
        elif isinstance(value, tuple):
            value = list(value)
        elif is_dataclass(value):
            value = asdict(value)
        out[f.name] = value
    return out


# Fields a spec class no longer has, which adapters saved before still carry (ignored on
# load): EncoderSpec's graph-only fields, removed with the unused graph encoder.
_RETIRED_FIELDS: dict[type, tuple[str, ...]] = {EncoderSpec: ("node_dim", "rounds", "pooling")}


def _spec_from_json(cls: type, d: dict[str, Any]) -> Any:
    d = dict(d)
    for name in _RETIRED_FIELDS.get(cls, ()):
        d.pop(name, None)
    for f in fields(cls):
        value = d.get(f.name)
        if isinstance(value, dict) and "model_type" in value:
            from transformers import AutoConfig

            value = dict(value)
            d[f.name] = AutoConfig.for_model(value.pop("model_type"), **value)
        elif isinstance(value, list) and "tuple" in str(f.type):
            d[f.name] = tuple(value)
    return cls(**d)


class NetLLM(nn.Module):
    """Encoders -> LLM -> heads. Only LoRA, encoders and heads are trainable."""

    def __init__(self, config: NetLLMConfig, backbone: Backbone | None = None, *, device: str = "auto",
                 dtype: str = "auto") -> None:
        super().__init__()
        if backbone is None:
            backbone = load_backbone(
                config.llm, layers=config.layers, lora=config.lora, pretrained=config.pretrained,
                seed=config.seed, device=device, dtype=dtype,
            )
        self.config = config
        self.backbone = backbone
        hidden = backbone.hidden_size
        self.encoders = ModalityEncoders(config.encoders, hidden)
        self.heads = nn.ModuleDict({name: build_head(spec, hidden) for name, spec in config.heads.items()})
        self.rl_tokens: nn.Module | None = None
        if config.rl is not None:
            from netllm.rl import ReturnTokens

            self.rl_tokens = ReturnTokens(config.rl, hidden)
        self.to(backbone.device)
        self.adapter_name: str | None = None  # set when the backbone is shared (``from_adapter(backbone=)``)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Encode each declared modality and concatenate the tokens in declaration order.

        Every input has a token axis: ``inputs[name]`` is (B, n_tokens, *feature shape);
        the result is (B, sum of n_tokens, hidden).
        """
        missing = [s.name for s in self.config.encoders if s.name not in inputs]
        if missing:
            raise NetLLMError(f"inputs: missing modality {missing[0]!r} (declared: "
                              f"{[s.name for s in self.config.encoders]})")
        tokens = [self.encoders(s.name, inputs[s.name].to(self.device)) for s in self.config.encoders]
        return torch.cat(tokens, dim=1)

    def hidden(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw: Any
    ) -> tuple[torch.Tensor, Any]:
        """LLM hidden states (float32) for token embeddings (B, L, H)."""
        if self.adapter_name is not None:
            self.backbone.use_adapter(self.adapter_name)
        hidden, cache = self.backbone(embeds, attention_mask, **kw)
        return hidden.float(), cache

    def forward(
        self, inputs: dict[str, torch.Tensor], attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One pass: embed -> LLM -> every head on the last real token's hidden state."""
        embeds = self.embed(inputs)
        hidden, _ = self.hidden(embeds, attention_mask)
        last = last_token_hidden(hidden, attention_mask)
        return {name: head(last) for name, head in self.heads.items()}

    def trainable_summary(self) -> dict[str, int]:
        llm_trainable, llm_total = self.backbone.parameter_counts()
        own = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return {
            "llm_total": llm_total,
            "lora": llm_trainable,
            "encoders_heads": sum(p.numel() for p in own if p.requires_grad),
            "trainable": llm_trainable + sum(p.numel() for p in own if p.requires_grad),
        }

    # ------------------------------------------------------------------ adapter folder

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoders, heads and RL token embeddings: everything outside the backbone."""
        return {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith("backbone.")
        }

    def save_adapter(self, folder: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> Path:
        """Write the adapter's three files into ``folder`` (other files there are kept).

        Each file is written to a temp file and renamed; the config goes last, so a
        folder is only ever recognised as an adapter once its weights are complete. The
        config is strict JSON: a NaN or Infinity in it (e.g. in ``extra``) raises
        ``NetLLMError`` before anything in ``folder`` is touched.
        """
        folder = Path(folder)
        if self.adapter_name is not None:
            raise NetLLMError(f"{folder}: this model shares its backbone with other adapters (serving); "
                              "it cannot be saved as an adapter")
        if self.backbone.merged:
            raise NetLLMError(f"{folder}: this model's LoRA is merged into its weights for inference; "
                              "it cannot be saved as an adapter")
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "format_version": FORMAT_VERSION,
            **self.config.to_dict(),
            "layers": self.backbone.num_layers,
            "backbone_name": self.backbone.name,
            "hidden_size": self.hidden_size,
            "extra": extra or {},
            **provenance(),
        }
        config_text = strict_json_dumps(config, path=folder / ADAPTER_CONFIG, indent=2, sort_keys=False) + "\n"
        (folder / ADAPTER_CONFIG).unlink(missing_ok=True)
        for name, state in ((LORA_WEIGHTS, self.backbone.lora_state_dict()), (MODULE_WEIGHTS, self.module_state_dict())):
            with atomic_path(folder / name) as tmp:
                save_file(state, str(tmp), metadata={"format": "pt"})
        atomic_write_text(folder / ADAPTER_CONFIG, config_text)
        return folder

    @classmethod
    def from_adapter(
        cls,
        folder: str | os.PathLike[str],
        *,
        task: str | None = None,
        llm: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        merge: bool = False,
        backbone: Backbone | None = None,
        adapter_name: str | None = None,
    ) -> "NetLLM":
        """Rebuild a model from an adapter folder on top of its base LLM; ``merge`` folds
        LoRA into the weights (an inference-only model: evaluation). With ``backbone`` (a
        bare frozen LLM, ``load_backbone(lora=None)``) the adapter's LoRA is attached to it
        under ``adapter_name`` instead, so several adapters share one LLM (serving)."""
        config_dict = read_adapter_config(folder)
        folder = Path(folder)
        if task is not None and config_dict["task"] != task:
            raise NetLLMError(f"{folder}: adapter is for task {config_dict['task']!r}, not {task!r}")
        if llm is not None and llm != config_dict["llm"]:
            raise NetLLMError(
                f"{folder}: adapter was trained on backbone {config_dict['llm']!r}, not --llm {llm!r}"
            )
        config = NetLLMConfig.from_dict(config_dict)
        if backbone is not None:
            check_shares_backbone(folder, config_dict, backbone)
        final_dtype: torch.dtype | None = None
        if merge and backbone is None:
            # an inference-only model: LoRA is folded into float32 weights first, then the
            # whole LLM is cast once (folding into bf16 weights would round the update)
            if dtype == "auto":
                dtype = current_inference_precision()
            final_dtype = resolve_dtype(dtype, resolve_device(device))
            dtype = "float32"
        model = cls(config, backbone=backbone, device=device, dtype=dtype)
        if model.hidden_size != config_dict.get("hidden_size", model.hidden_size):
            raise NetLLMError(
                f"{folder}: adapter expects hidden size {config_dict['hidden_size']}, backbone "
                f"{config.llm!r} has {model.hidden_size}"
            )
        try:
            lora_state = load_file(str(folder / LORA_WEIGHTS))
            module_state = load_file(str(folder / MODULE_WEIGHTS))
        except (OSError, ValueError, RuntimeError) as e:
            raise NetLLMError(f"{folder}: unreadable adapter weights: {e}") from None
        if backbone is not None:
            name = adapter_name or config.task
            backbone.add_adapter(name, config.lora, lora_state, str(folder / LORA_WEIGHTS))
            model.adapter_name = name
        else:
            model.backbone.load_lora_state_dict(lora_state, str(folder / LORA_WEIGHTS))
        own = model.module_state_dict()
        if set(own) != set(module_state):
            diff = sorted(set(own) ^ set(module_state))[:3]
            raise NetLLMError(f"{folder / MODULE_WEIGHTS}: modules do not match the config, e.g. {diff}")
        model.load_state_dict(module_state, strict=False)
        model.eval()
        if merge:
            model.backbone.merge_lora()
            if final_dtype is not None and final_dtype != model.backbone.dtype:
                model.backbone.cast(final_dtype)
        return model


def check_shares_backbone(folder: Path, config: dict[str, Any], backbone: Backbone) -> None:
    """An adapter can join ``backbone`` only if it was trained on the same frozen LLM:
    the same model, layer count and (for the random-weight control) the same weights."""
    wanted = {"backbone": config.get("llm"), "layers": config.get("layers"),
              "pretrained": config.get("pretrained", True)}
    have = {"backbone": backbone.spec, "layers": backbone.num_layers, "pretrained": backbone.pretrained}
    if not wanted["pretrained"]:
        wanted["seed"], have["seed"] = config.get("seed"), backbone.seed
    diff = [k for k in wanted if wanted[k] != have[k]]
    if diff or backbone.trains_in_full:
        k = diff[0] if diff else "backbone"
        raise NetLLMError(f"{folder}: needs {k} {wanted[k]!r} but the shared backbone has {have[k]!r}; "
                          "adapters served together must share one base LLM")


class BestAdapter:
    """Keeps in ``folder`` the adapter of the evaluation with the best validation score.

    Call ``update(model, score, step)`` from the training loop's eval callback and
    ``finish(model)`` after training: without any evaluation the final model is saved.
    ``extra()`` supplies the run's details; ``"best"`` is added to them:
    ``{metric: score, "step": step}`` for an adapter chosen on validation, ``null`` for
    the final model of a run without evaluation.

    ``resume=True`` (pass it with ``train(..., resume=True)``) continues the run whose
    adapter is already in ``folder``: its recorded best (``extra.best`` of
    adapter_config.json) is what later evaluations must beat, and ``finish`` keeps it.
    Without ``resume`` an adapter already in ``folder`` belongs to an earlier run and is
    replaced. ``finish`` never overwrites an adapter chosen on validation.
    """

    def __init__(self, folder: str | os.PathLike[str], metric: str, higher_is_better: bool,
                 extra: Any = dict, *, resume: bool = False) -> None:
        self.folder, self.metric, self.higher_is_better, self.extra = Path(folder), metric, higher_is_better, extra
        self.score: float | None = None  # the best validation score so far (None: no evaluation yet)
        self.step = 0  # the step it was reached at
        self.saved = False  # whether ``folder`` holds the adapter of ``score``
        if resume:
            self._restore()

    @property
    def best(self) -> dict[str, float] | None:
        """``{metric: score, "step": step}`` of the kept adapter; None before any evaluation."""
        return None if self.score is None else {self.metric: self.score, "step": self.step}

    def _restore(self) -> None:
        """Take over the best score and step recorded by the adapter already in ``folder``."""
        path = self.folder / ADAPTER_CONFIG
        if not path.is_file():
            return
        try:
            best = (json.loads(path.read_text()).get("extra") or {}).get("best")
        except (OSError, ValueError, AttributeError) as e:
            raise NetLLMError(f"{path}: unreadable adapter config, cannot resume its best adapter: {e}") from None
        if not isinstance(best, dict):  # saved without validation (null, or -Infinity before)
            return
        score = best.get(self.metric)
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            log.warning("%s: recorded best %r has no score for %r; not resumed", path, best, self.metric)
            return
        if not math.isfinite(score):  # an older adapter saved without validation (-Infinity)
            return
        self.score, self.step, self.saved = float(score), int(best.get("step", 0)), True
        log.info("resuming best adapter in %s: %s=%g at step %d", self.folder, self.metric, self.score, self.step)

    def _save(self, model: "NetLLM") -> None:
        model.save_adapter(self.folder, extra={**self.extra(), "best": self.best})

    def update(self, model: "NetLLM", score: float, step: int) -> bool:
        """Save ``model`` if ``score`` beats the best so far; whether it did.

        A non-finite score (NaN, +-Infinity) never counts as the best.
        """
        score = float(score)
        if not math.isfinite(score):
            log.warning("validation %s is %s at step %d; not a candidate for the best adapter",
                        self.metric, score, step)
            return False
        better = self.score is None or (score > self.score if self.higher_is_better else score < self.score)
        if better:
            self.score, self.step = score, int(step)
            self._save(model)
            self.saved = True
        return better

    def finish(self, model: "NetLLM") -> Path:
        """The adapter folder; saves the final ``model`` there unless an adapter chosen on
        validation (this run's, or the resumed run's) is already in it."""
        if not self.saved:
            model.eval()
            self._save(model)
        return self.folder


def read_adapter_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise NetLLMError(f"{folder}: not a NetLLM adapter folder (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NetLLMError(f"{path}: unreadable adapter config: {e}") from None
    for key in ("task", "llm", "encoders", "heads", "lora"):
        if key not in config:
            raise NetLLMError(f"{path}: adapter config lacks {key!r}")
    return config


def adapter_digest(folder: str | os.PathLike[str]) -> str:
    """A sha256 over the files an adapter is loaded from (its config and every
    ``.safetensors`` beside it): equal digests, equal policies. Benchmarks key cached
    evaluations by it."""
    import hashlib

    folder = Path(folder)
    read_adapter_config(folder)  # not an adapter: the one-line error
    h = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and (p.name == ADAPTER_CONFIG
                                                                       or p.suffix == ".safetensors")):
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def last_token_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden state of the last real token of each row (right or left padding)."""
    if attention_mask is None:
        return hidden[:, -1]
    length = attention_mask.shape[1]
    # index of the last 1 in each row
    idx = length - 1 - torch.flip(attention_mask.long(), dims=[1]).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
