"""The Task interface: exactly what the framework and the CLI call.

A task is a :class:`Task` subclass registered under the entry-point group
``netllm.tasks`` (the built-in ones too, in this package's pyproject.toml)::

    [project.entry-points."netllm.tasks"]
    bwpred = "netllm_bwpred:TASK"

It declares

* its options, one typed dataclass per command — ``Recipe`` (adapt), ``EvalOptions``
  (eval), ``CollectOptions`` (collect, decision tasks), ``BenchOptions`` (bench) — from
  which the CLI builds ``netllm <command> <task> --help``; every default lives there;
* its data sets (``datasets``: fetch groups with their upstream folders, ``manifest``:
  the sha256 list, ``post_fetch``: a step after fetching);
* its model (``model_config``), its baselines and how a run folder becomes a policy;
* the commands: ``evaluate`` (every task), ``adapt`` (every task), ``collect`` (decision
  tasks), ``bench`` and ``demo`` (optional).

The CLI checks every option (``Options.check``) and prepares the run folder before it
calls a command, so a command never sees a bad value.

Policies share one call shape per task kind, so a baseline, a trained adapter and a
served model are interchangeable in ``eval`` and ``bench``:

* decision tasks:   ``policy.act(observation) -> action``
* prediction tasks: ``policy.predict(history) -> future``
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Protocol

from netllm.encoders import EncoderSpec
from netllm.heads import HeadSpec
from netllm.options import Options
from netllm.recipe import Recipe
from netllm.stats import spread
from netllm.utils import NetLLMError

if TYPE_CHECKING:
    from netllm.data import DataGroup
    from netllm.model import NetLLMConfig


class DecisionPolicy(Protocol):
    name: str

    def reset(self, seed: int | None = None) -> None: ...

    def act(self, observation: Any) -> Any: ...


class PredictionPolicy(Protocol):
    name: str

    def predict(self, history: Any) -> Any: ...


@dataclass
class Metrics:
    """Result of evaluating one policy: one value per seed plus named breakdowns."""

    metric: str  # e.g. "qoe", "mae_deg", "jct_s"
    higher_is_better: bool
    per_seed: dict[int, float]
    parts: dict[str, float] = field(default_factory=dict)  # e.g. bitrate / rebuffer / smoothness
    rows: list[dict[str, Any]] = field(default_factory=list)  # per-trace / per-job / per-user rows
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the spread over training seeds (results.json)

    @property
    def mean(self) -> float:
        values = list(self.per_seed.values())
        return float(sum(values) / len(values))

    @property
    def std(self) -> float:
        """The sample std over seeds (n - 1), as everywhere in netllm (:func:`netllm.stats.spread`)."""
        return float(spread(self.per_seed)["std"])

    def summary(self) -> dict[str, Any]:
        """The ``results.json`` entry: {"metric", "mean", "std", "seeds"}."""
        return {"metric": self.metric, "mean": self.mean, "std": self.std,
                "seeds": sorted(self.per_seed), "per_seed": self.per_seed, **self.parts, **self.info}


@dataclass
class NoOptions(Options):
    """A command without task-specific options."""


class Task(ABC):
    """A networking use case: what goes into the LLM, what comes out, how it is judged."""

    name: ClassVar[str]
    kind: ClassVar[Literal["prediction", "decision"]]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    summary: ClassVar[str] = ""  # one line for `netllm --help`
    has_demo: ClassVar[bool] = False  # `netllm demo` runs :meth:`demo`
    parallel: ClassVar[bool] = False  # eval/collect spread work with netllm.parallel (--workers, --ray-address)

    # one typed options dataclass per command (the CLI is built from them)
    Recipe: ClassVar[type[Recipe]] = Recipe  # the adaptation's hyper-parameters
    AdaptOptions: ClassVar[type[Recipe]] = Recipe  # netllm adapt: the recipe + its inputs (pools)
    EvalOptions: ClassVar[type[Options]] = NoOptions
    CollectOptions: ClassVar[type[Options] | None] = None  # decision tasks: netllm collect
    BenchOptions: ClassVar[type[Options] | None] = None  # netllm bench <task>
    FinetuneOptions: ClassVar[type[Options] | None] = None  # decision tasks: netllm finetune (online RL)
    ServeOptions: ClassVar[type[Options] | None] = None  # netllm serve: the task's own flags (--<task>-<field>)
    fallbacks: ClassVar[tuple[str, ...]] = ()  # serve: policies that answer when the model cannot in time
    serve_note: ClassVar[str] = "it has no HTTP service"  # why a task without ServeOptions is not served

    # a light module (no torch: `netllm data status` imports it) that defines the task's data:
    # GROUPS (its DataGroups), manifest() and post_fetch(root); None: the task fetches no data
    data_module: ClassVar[str | None] = None

    # -- data ---------------------------------------------------------------------------

    def _data(self) -> Any:
        return importlib.import_module(self.data_module) if self.data_module else None

    def datasets(self) -> tuple["DataGroup", ...]:
        """The task's data set groups (``netllm data fetch <task>`` fetches them)."""
        data = self._data()
        return tuple(data.GROUPS) if data else ()

    def manifest(self) -> str:
        """``sha256  path`` lines of every file of :meth:`datasets` (empty: none)."""
        data = self._data()
        return data.manifest() if data else ""

    def post_fetch(self, root: Path) -> None:
        """A step after the task's files were fetched into ``root`` (idempotent)."""
        data = self._data()
        if data:
            data.post_fetch(root)

    # -- model and policies -------------------------------------------------------------

    @abstractmethod
    def model_config(self, recipe: Recipe | None = None) -> "NetLLMConfig":
        """The NetLLM model of ``recipe`` (default: the task's default recipe)."""

    def encoders(self) -> list[EncoderSpec]:
        """The modalities of one sample / one decision step, in token order."""
        return self.model_config().encoders

    def heads(self) -> dict[str, HeadSpec]:
        """The networking head(s) that turn the last hidden state into a valid answer."""
        return self.model_config().heads

    @abstractmethod
    def baselines(self) -> dict[str, Callable[[Any], Any]]:
        """Baseline name -> factory of a policy (given the evaluation options)."""

    @abstractmethod
    def policy_from_run(self, folder: Path, options: Any, device: str = "auto") -> Any:
        """The policy of a run folder (a NetLLM adapter, or another run of this task);
        a NetLLMError naming the folder if it is none."""

    # -- commands -------------------------------------------------------------------------

    @abstractmethod
    def evaluate(self, policies: dict[str, Any], seeds: list[int], options: Any, out: Path) -> dict[str, Metrics]:
        """Run every policy on the evaluation setting of ``options`` for each seed and
        write the results (table, results.json, rows.csv, plots) into ``out``."""

    @abstractmethod
    def adapt(self, out: Path, recipe: Any, device: str = "auto", resume: bool = False) -> Path:
        """DD-LRNA by ``recipe`` into the run folder ``out``; returns the adapter folder."""

    def collect(self, policies: list[str], seeds: list[int], options: Any, out: Path) -> Path:
        """Decision tasks: an experience pool of ``policies`` into ``out``; returns its path."""
        raise NetLLMError(f"task {self.name!r} is a {self.kind} task: it collects no experience pool")

    def bench(self, options: Any, out: Path, device: str = "auto") -> dict[str, Any]:
        """The whole pipeline against the baselines; finished stages are reused."""
        raise NetLLMError(f"task {self.name!r} has no benchmark")

    def finetune(self, options: Any, out: Path, device: str = "auto", resume: bool = False) -> Path:
        """Decision tasks: online fine-tuning of an offline adapter in the simulator
        (``netllm.finetune``); returns the adapter folder."""
        raise NetLLMError(f"task {self.name!r} has no online fine-tuning")

    def service(self, ctx: Any, options: Any, fallback: str) -> Any:
        """``netllm serve``: an object with ``router`` (a FastAPI ``APIRouter``: the task's
        endpoints, request and response models) and ``bind(model, folder)`` (called once
        the shared LLM and this task's adapter are loaded); decisions go through
        ``ctx.decide`` (batched, deadline, ``fallback``). See ``netllm.serve``."""
        raise NetLLMError(f"task {self.name!r} is not served over HTTP ({self.serve_note})")

    def demo(self, device: str = "auto") -> Any:
        """A small end-to-end run against the baselines (``has_demo``)."""
        raise NetLLMError(f"task {self.name!r} has no demo")

    def check_adapt(self, recipe: Any) -> None:
        """Checks of an adaptation's inputs (files named by the recipe) before any work."""

    def check_eval(self, options: Any) -> None:
        """Checks of an evaluation's inputs (the data it reads) before the run folder is written."""
