"""Training checkpoints: what ``netllm.train`` saves so a run can be resumed exactly.

Only parameters with ``requires_grad`` are saved: the frozen LLM never enters a
checkpoint. A checkpoint is a folder ``out_dir/checkpoint/`` written atomically (temp
folder, then rename; only the last one is kept), without pickle::

    model.safetensors      trainable parameters, by name
    optimizer.safetensors  AdamW state, flattened to ``state.{param_index}.{key}``
    rng_state.safetensors  torch CPU (and CUDA) generator states
    trainer_state.json     step, loss, elapsed time, optimizer param_groups, parameter
                           names, Python/numpy generator states, the config

The learning rate is a pure function of the step, so the "scheduler state" is the
step itself. Together with the optimizer state, the generator states (dropout) and the
batch index, that makes a resumed run reproduce the uninterrupted one.

Public API:

* ``trainable_named_parameters`` / ``trainable_state_dict`` /
  ``load_trainable_state_dict`` -- the trainable parameters (also used for adapters);
* ``rng_state`` / ``set_rng_state`` -- every random generator (Python, numpy, torch,
  CUDA), captured and restored;
* ``new_trainer_state`` -- the run-constant part of ``trainer_state.json``;
* ``save_checkpoint`` -- write ``out_dir/checkpoint/`` atomically;
* ``resume_checkpoint`` -- tidy an interrupted save, then load the checkpoint (resume)
  or refuse a folder that holds one (fresh run);
* ``recover_checkpoint`` / ``load_checkpoint`` -- the two halves of the above;
* ``completed_steps`` -- the step of the last checkpoint in a folder (0: none);
* ``save_small_model`` -- a small model trained without the LLM (a task's trained
  baseline): its weights, then its config, each file written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from netllm.utils import NetLLMError, atomic_path, atomic_write_text, provenance

log = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "checkpoint"
CHECKPOINT_FORMAT = 1
TRAINER_STATE = "trainer_state.json"

__all__ = [
    "CHECKPOINT_DIRNAME",
    "CHECKPOINT_FORMAT",
    "completed_steps",
    "load_checkpoint",
    "load_trainable_state_dict",
    "new_trainer_state",
    "recover_checkpoint",
    "resume_checkpoint",
    "rng_state",
    "save_checkpoint",
    "save_small_model",
    "set_rng_state",
    "trainable_named_parameters",
    "trainable_state_dict",
]


# --------------------------------------------------------------------------------------
# Trainable parameters (also used to save/load adapters)
# --------------------------------------------------------------------------------------


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad``, in model order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters only, by name (detached, on CPU, contiguous).

    The frozen LLM is not in it, so the result is small and safe to write with
    ``safetensors.torch.save_file``.
    """
    return {
        name: p.detach().to("cpu").contiguous() for name, p in trainable_named_parameters(model)
    }


def load_trainable_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    *,
    source: str | os.PathLike[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Copy ``state_dict`` into the model's trainable parameters, in place.

    With ``strict`` the names must be exactly the model's trainable parameter names;
    otherwise only the common names are loaded. Returns ``(missing, unexpected)``.
    Shapes must always match. ``source`` (a file or folder) is named in error messages.
    """
    where = f" from {source}" if source is not None else ""
    params = dict(trainable_named_parameters(model))
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    if strict and (missing or unexpected):
        raise NetLLMError(
            f"cannot load trainable parameters{where}: they do not match the model "
            f"(missing {_some(missing)}; unexpected {_some(unexpected)})"
        )
    with torch.no_grad():
        for name in sorted(set(params) & set(state_dict)):
            param, value = params[name], state_dict[name]
            if tuple(param.shape) != tuple(value.shape):
                raise NetLLMError(
                    f"cannot load trainable parameter {name!r}{where}: shape "
                    f"{tuple(value.shape)} does not match the model's {tuple(param.shape)}"
                )
            param.copy_(value.to(device=param.device, dtype=param.dtype))
    return missing, unexpected


def _some(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# --------------------------------------------------------------------------------------
# Random generator states (Python, numpy, torch CPU, CUDA)
# --------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The state of every random generator the training loop can touch."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA only for the same device count)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning(
                "checkpoint has CUDA RNG states for a different device count; not restored"
            )


def _rng_to_files(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split generator states into a JSON part (Python, numpy) and tensors (torch)."""
    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    as_json = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": state["torch"].clone()}
    for i, cuda_state in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = cuda_state.cpu().clone()
    return as_json, tensors


def _rng_from_files(
    as_json: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    version, internal, gauss = as_json["python"]
    name, keys, pos, has_gauss, cached = as_json["numpy"]
    state: dict[str, Any] = {
        "python": (int(version), tuple(int(x) for x in internal), gauss),
        "numpy": (name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)),
        "torch": tensors["torch"].to(torch.uint8),
    }
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda:
        state["cuda"] = [tensors[k].to(torch.uint8) for k in cuda]
    return state


# --------------------------------------------------------------------------------------
# Optimizer state: tensors to safetensors, param_groups to JSON
# --------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _optimizer_to_files(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Flatten ``optimizer.state_dict()`` to tensors ``state.{idx}.{key}`` + JSON groups."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = tensor.detach().to("cpu").contiguous().clone()
    return tensors, _jsonable(sd["param_groups"])


def _optimizer_from_files(
    tensors: Mapping[str, torch.Tensor], param_groups: list[dict[str, Any]]
) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for flat, tensor in tensors.items():
        _, idx, key = flat.split(".", 2)
        state.setdefault(int(idx), {})[key] = tensor
    groups = []
    for group in param_groups:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# --------------------------------------------------------------------------------------
# Checkpoints: one folder, written atomically, no pickle
# --------------------------------------------------------------------------------------


def new_trainer_state(param_names: list[str], config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``trainer_state.json`` that is the same for every checkpoint of a run.

    ``config`` is the loop's hyper-parameters as a dict (``dataclasses.asdict``). The
    loop adds ``step``, ``loss`` and ``elapsed_s`` before each :func:`save_checkpoint`.
    """
    return {
        "format_version": CHECKPOINT_FORMAT,
        "param_names": list(param_names),
        "config": dict(config),
        "provenance": provenance(),
    }


def save_checkpoint(
    out_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
) -> Path:
    """Write ``out_dir/checkpoint/`` atomically and return it.

    Files go into a temporary folder beside it, which then replaces the old checkpoint
    by two renames; a crash at any moment leaves either the old or the new checkpoint
    complete (:func:`recover_checkpoint` finishes an interrupted swap). The random
    generator states are captured here, at the time of the call.
    """
    out_dir = Path(out_dir)
    final = out_dir / CHECKPOINT_DIRNAME
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_DIRNAME}.tmp-", dir=out_dir))
    try:
        meta = {"format": "pt", "step": str(trainer_state["step"])}
        save_file(trainable_state_dict(model), tmp / "model.safetensors", metadata=meta)
        opt_tensors, param_groups = _optimizer_to_files(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors", metadata=meta)
        rng_json, rng_tensors = _rng_to_files(rng_state())
        save_file(rng_tensors, tmp / "rng_state.safetensors", metadata=meta)
        state = {**trainer_state, "param_groups": param_groups, "rng": rng_json}
        # Written last: a folder with trainer_state.json is a complete checkpoint.
        (tmp / TRAINER_STATE).write_text(
            json.dumps(state, indent=1, sort_keys=True, default=str) + "\n"
        )
        old = None
        if final.exists():
            old = out_dir / f".{CHECKPOINT_DIRNAME}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def recover_checkpoint(out_dir: str | os.PathLike[str]) -> None:
    """Remove half-written temp folders; finish a swap interrupted between its renames."""
    out_dir = Path(out_dir)
    final = out_dir / CHECKPOINT_DIRNAME
    for tmp in out_dir.glob(f".{CHECKPOINT_DIRNAME}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    olds = sorted(out_dir.glob(f".{CHECKPOINT_DIRNAME}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists() and (olds[-1] / TRAINER_STATE).exists():
        os.rename(olds.pop(), final)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def completed_steps(out_dir: str | os.PathLike[str]) -> int:
    """The step of the last checkpoint in ``out_dir`` (0 when there is none): a run whose
    value equals its ``steps`` has finished."""
    try:
        return int(json.loads((Path(out_dir) / CHECKPOINT_DIRNAME / TRAINER_STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def load_checkpoint(
    ckpt: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    param_names: list[str],
    *,
    grad_accum: int,
) -> dict[str, Any]:
    """Restore trainable parameters, optimizer and RNG from ``ckpt``; return its state.

    ``grad_accum`` must be the checkpoint's: otherwise the batch indices of the resumed
    run would not line up with the interrupted one.
    """
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / TRAINER_STATE).read_text())
        params = load_file(ckpt / "model.safetensors")
        opt_tensors = load_file(ckpt / "optimizer.safetensors")
        rng_tensors = load_file(ckpt / "rng_state.safetensors")
    except (OSError, ValueError) as exc:  # missing file, bad JSON, bad safetensors header
        raise NetLLMError(f"checkpoint {ckpt} is unreadable or incomplete: {exc}") from None
    if state.get("format_version") != CHECKPOINT_FORMAT:
        raise NetLLMError(f"checkpoint {ckpt}: unknown format {state.get('format_version')!r}")

    load_trainable_state_dict(model, params, strict=True, source=f"checkpoint {ckpt}")
    if state["param_names"] != param_names:
        raise NetLLMError(
            f"checkpoint {ckpt}: the trainable parameters are in a different order than in "
            "the model, so its optimizer state cannot be matched to them"
        )
    if state["config"]["grad_accum"] != grad_accum:
        raise NetLLMError(
            f"checkpoint {ckpt} was written with grad_accum={state['config']['grad_accum']}, "
            f"but this run uses grad_accum={grad_accum}; the batch indices would not "
            "line up, so resume with the same value"
        )
    try:
        optimizer.load_state_dict(_optimizer_from_files(opt_tensors, state["param_groups"]))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise NetLLMError(
            f"checkpoint {ckpt}: optimizer state does not fit the model: {exc}"
        ) from None
    set_rng_state(_rng_from_files(state["rng"], rng_tensors))
    return state


def resume_checkpoint(
    out_dir: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    param_names: list[str],
    *,
    grad_accum: int,
    resume: bool,
) -> dict[str, Any] | None:
    """Where a run starts: the loaded trainer state, or ``None`` for a fresh start.

    First tidies what an interrupted :func:`save_checkpoint` left behind. With
    ``resume`` and a checkpoint in ``out_dir``, loads it into ``model``, ``optimizer``
    and the random generators and returns its ``trainer_state.json``; with ``resume``
    and no checkpoint, returns ``None``. Without ``resume`` a folder that already holds
    a checkpoint is refused (``NetLLMError``).
    """
    out_dir = Path(out_dir)
    recover_checkpoint(out_dir)
    ckpt = out_dir / CHECKPOINT_DIRNAME
    if not ckpt.exists():
        if resume:
            log.info("no checkpoint in %s; starting fresh", out_dir)
        return None
    if not resume:
        raise NetLLMError(
            f"{out_dir} already holds a checkpoint ({ckpt}); resume it or use another folder"
        )
    state = load_checkpoint(ckpt, model, optimizer, param_names, grad_accum=grad_accum)
    log.info("resuming from %s at step %d", ckpt, int(state["step"]))
    return state


# --------------------------------------------------------------------------------------
# Small models trained without the LLM (a task's trained baselines)
# --------------------------------------------------------------------------------------


def save_small_model(folder: str | os.PathLike[str], net: nn.Module, config: Mapping[str, Any], *,
                     config_file: str, weights_file: str) -> Path:
    """``net``'s weights (safetensors) and ``config`` + provenance (JSON) in ``folder``.

    The config goes last and the old one is removed first, so a folder whose config file
    exists holds a complete run; each file is written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / config_file).unlink(missing_ok=True)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(folder / weights_file) as tmp:
        save_file(state, str(tmp))
    atomic_write_text(folder / config_file, json.dumps({**config, **provenance()}, indent=2, default=str) + "\n")
    return folder
