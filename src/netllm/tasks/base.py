"""The Task interface every use case implements.

A new networking task is ONE folder ``tasks/<name>/`` whose ``__init__.py`` exposes
``TASK``, an instance of a :class:`Task` subclass. It declares its modalities (encoder
specs), its head(s), its data or environment, its baselines and its metric; the
framework (backbone, encoders, heads, model, rl, train, cli) stays unchanged.

Policies share one call shape per task kind, so a baseline, a trained adapter and a
served model are interchangeable in ``eval`` and ``bench``:

* decision tasks:   ``policy.act(observation) -> action``
* prediction tasks: ``policy.predict(history) -> future``
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

from netllm.encoders import EncoderSpec
from netllm.heads import HeadSpec

if TYPE_CHECKING:
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

    @property
    def mean(self) -> float:
        values = list(self.per_seed.values())
        return float(sum(values) / len(values))

    @property
    def std(self) -> float:
        values = list(self.per_seed.values())
        m = self.mean
        return float((sum((v - m) ** 2 for v in values) / len(values)) ** 0.5)

    def summary(self) -> dict[str, Any]:
        """The ``results.json`` entry: {"metric", "mean", "std", "seeds"}."""
        return {"metric": self.metric, "mean": self.mean, "std": self.std,
                "seeds": sorted(self.per_seed), "per_seed": self.per_seed, **self.parts}


class Task(ABC):
    """A networking use case: what goes into the LLM, what comes out, how it is judged."""

    name: str
    kind: Literal["prediction", "decision"]
    metric: str
    higher_is_better: bool

    @abstractmethod
    def model_config(self) -> "NetLLMConfig":
        """The task's default NetLLM model (modalities, heads, RL spec); :meth:`encoders`
        and :meth:`heads` read it."""

    def encoders(self) -> list[EncoderSpec]:
        """The modalities of one sample / one decision step, in token order."""
        return self.model_config().encoders

    def heads(self) -> dict[str, HeadSpec]:
        """The networking head(s) that turn the last hidden state into a valid answer."""
        return self.model_config().heads

    @abstractmethod
    def baselines(self) -> dict[str, Callable[..., Any]]:
        """Baseline name -> factory of a policy with the task's call shape."""

    @abstractmethod
    def evaluate(self, policy: Any, seeds: list[int], **options: Any) -> Metrics:
        """Run ``policy`` on the task's evaluation setting for each seed."""
