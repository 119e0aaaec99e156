"""One base LLM for every served task: adapters attached by name to one frozen backbone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from netllm.backbone import Backbone, load_backbone, resolve_dtype
from netllm.model import NetLLM, read_adapter_config
from netllm.utils import NetLLMError, resolve_device


def parse_adapters(values: list[str]) -> dict[str, Path]:
    """``--adapter abr=runs/abr`` (repeatable) -> {"abr": Path("runs/abr")}."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise NetLLMError(f"--adapter {value!r}: expected TASK=FOLDER, e.g. abr=runs/abr")
        if name in out:
            raise NetLLMError(f"--adapter: task {name!r} is given twice")
        out[name.strip()] = Path(path.strip())
    if not out:
        raise NetLLMError("--adapter: give at least one TASK=FOLDER")
    return out


def parse_pairs(value: str, option: str) -> dict[str, str]:
    """``abr=bba,vp=no-motion`` -> {"abr": "bba", "vp": "no-motion"}."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, sep, choice = part.partition("=")
        if not sep or not name or not choice:
            raise NetLLMError(f"{option} {value!r}: expected TASK=NAME[,TASK=NAME...]")
        out[name.strip()] = choice.strip()
    return out


def check_adapters(adapters: Mapping[str, str | os.PathLike[str]]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(each adapter's config, the base they share): every adapter must be of the task it
    is served for and need the same frozen LLM (model, layer count, weights); the first
    one that does not is named. Reads configs only (cheap: before anything loads)."""
    if not adapters:
        raise NetLLMError("--adapter: give at least one TASK=FOLDER")
    configs: dict[str, dict[str, Any]] = {}
    for task, folder in adapters.items():
        config = read_adapter_config(folder)  # a one-line error for a missing / bad folder
        if config.get("task") != task:
            raise NetLLMError(f"--adapter {task}={folder}: the adapter is for task {config.get('task')!r}")
        configs[task] = config
    first_task, first = next(iter(configs.items()))
    keys = ("llm", "layers", "pretrained", "seed")
    base = {k: first.get(k, True if k == "pretrained" else None) for k in keys}
    for task, config in configs.items():
        if config.get("llm") == "scratch":
            raise NetLLMError(f"--adapter {task}={adapters[task]}: a from-scratch transformer has no frozen "
                              "base to share; serve a NetLLM adapter")
        for key in keys[:3] + (() if base["pretrained"] else ("seed",)):
            value = config.get(key, True if key == "pretrained" else None)
            if value != base[key]:
                raise NetLLMError(
                    f"--adapter {task}={adapters[task]}: needs {key} {value!r}, but --adapter "
                    f"{first_task}={adapters[first_task]} needs {base[key]!r}; adapters served together "
                    "share one base LLM")
    return configs, base


class ModelHub:
    """The served models: one :class:`Backbone` loaded once, one :class:`NetLLM` per task
    (its encoders and heads of its own, its LoRA attached to the shared backbone under the
    task's name). Adapters that need another base (model, layer count, random-weight
    control) are refused before anything is loaded, naming the adapter."""

    def __init__(self, adapters: Mapping[str, str | os.PathLike[str]], device: str = "auto",
                 dtype: str = "auto") -> None:
        configs, base = check_adapters(adapters)
        target = resolve_dtype(dtype, resolve_device(device))  # auto: bf16 on CUDA, float32 elsewhere
        self.backbone: Backbone = load_backbone(base["llm"], layers=base["layers"], lora=None, device=device,
                                                dtype="float32", pretrained=bool(base["pretrained"]),
                                                seed=int(base["seed"] or 0))
        self.models: dict[str, NetLLM] = {}
        self.folders = {task: Path(folder) for task, folder in adapters.items()}
        for task, folder in self.folders.items():
            self.models[task] = NetLLM.from_adapter(folder, task=task, backbone=self.backbone,
                                                    adapter_name=task).eval()
        self.configs = configs
        if len(self.models) == 1:  # nothing to switch: fold LoRA in (faster, and the same weights as `eval`)
            self.backbone.llm.merge_adapter()
            self.backbone.merged = True
            self.backbone.cast(target)  # folded in float32, rounded once: `eval --dtype`'s weights
        else:  # the frozen weights in ``target``; every adapter's LoRA stays float32
            for name, p in self.backbone.llm.named_parameters():
                if "lora_" not in name:
                    p.data = p.data.to(target)

    def describe(self) -> dict[str, Any]:
        _, total = self.backbone.parameter_counts()
        return {
            "backbone": self.backbone.name, "layers": self.backbone.num_layers,
            "parameters": total, "adapters": {t: str(f) for t, f in self.folders.items()},
        }
