"""Typed options: every option of a task command is a field of one dataclass.

A task declares, per command, a dataclass of :class:`Options` whose fields carry their
default and their help text (:func:`opt`). The CLI is built from those fields
(``netllm adapt abr --help`` lists every one with its default), and :meth:`Options.check`
validates a filled-in instance before any work starts, so a bad value ends in one line
naming the option and nothing is written.

    @dataclass
    class EvalOptions(Options):
        traces: str = opt("fcc-test", "Trace set: fcc-train, fcc-valid, fcc-test or a folder.")
        noise: float = opt(0.0, "Delay noise.", min=0)

        def check(self) -> None:      # cross-field rules, after the per-field ones
            super().check()
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence, TypeVar

from netllm.utils import NetLLMError

T = TypeVar("T", bound="Options")


def opt(default: Any, help: str, *, choices: Sequence[str] | None = None, min: float | None = None,
        max: float | None = None, flag: str | None = None) -> Any:
    """A field of an options dataclass: its default, its help text and its limits.

    ``choices``: the allowed values of a text option; ``min`` / ``max``: bounds of a
    number (inclusive); ``flag``: the on/off spelling of a boolean (``"--pretrained/--random-init"``).
    """
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "max": max,
                "flag": flag}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


def option_name(name: str) -> str:
    """The command-line spelling of a field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def base_type(annotation: Any) -> tuple[type, bool]:
    """(the value type, whether None is allowed) of a field annotation."""
    if isinstance(annotation, str):
        raise TypeError(f"unresolved annotation {annotation!r}")
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"options support X | None only, got {annotation}")
        return base_type(args[0])[0], True
    if origin is not None:
        return origin, False
    return annotation, False


def fields_of(cls: type["Options"]) -> list[tuple[dataclasses.Field[Any], type, bool]]:
    """(field, value type, optional) of every field of an options class, in order."""
    hints = typing.get_type_hints(cls)
    return [(f, *base_type(hints[f.name])) for f in dataclasses.fields(cls)]


@dataclass
class Options:
    """Base of every options dataclass: field-wise checks from the ``opt`` metadata."""

    def check(self) -> None:
        """Raise NetLLMError naming the first bad option. Subclasses add cross-field rules."""
        for f, kind, optional in fields_of(type(self)):
            value = getattr(self, f.name)
            name = option_name(f.name)
            if value is None:
                if optional:
                    continue
                raise NetLLMError(f"{name}: a value is required")
            if kind is bool:
                if not isinstance(value, bool):
                    raise NetLLMError(f"{name}: expected true or false, got {value!r}")
                continue
            if kind in (int, float):
                try:
                    number = kind(value)
                except (TypeError, ValueError):
                    raise NetLLMError(f"{name}: expected {'an integer' if kind is int else 'a number'}, "
                                      f"got {value!r}") from None
                if kind is int and isinstance(value, float) and not float(value).is_integer():
                    raise NetLLMError(f"{name}: expected an integer, got {value!r}")
                if not math.isfinite(number):
                    raise NetLLMError(f"{name}: must be finite, got {value!r}")
                lo, hi = f.metadata.get("min"), f.metadata.get("max")
                if lo is not None and number < lo:
                    raise NetLLMError(f"{name}: must be >= {lo:g}, got {value!r}")
                if hi is not None and number > hi:
                    raise NetLLMError(f"{name}: must be <= {hi:g}, got {value!r}")
                object.__setattr__(self, f.name, number)
                continue
            if kind is str:
                choices = f.metadata.get("choices")
                if not isinstance(value, str):
                    raise NetLLMError(f"{name}: expected text, got {value!r}")
                if choices and value not in choices:
                    raise NetLLMError(f"{name}: one of {', '.join(choices)}; got {value!r}")

    @classmethod
    def build(cls: type[T], **values: Any) -> T:
        """An instance from keyword values, checked (unknown names are an error)."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise NetLLMError(f"{option_name(key)}: not an option here; options: "
                                  + ", ".join(option_name(k) for k in sorted(known)))
        options = cls(**values)
        options.check()
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def split_list(text: str, option: str, allowed: Sequence[str] | None = None) -> list[str]:
    """``a,b,c`` -> [a, b, c]; every item must be in ``allowed`` (when given)."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    if not items:
        raise NetLLMError(f"{option}: expected a comma-separated list, got {text!r}")
    if allowed is not None:
        for item in items:
            if item not in allowed:
                raise NetLLMError(f"{option}: unknown {item!r}; choose from {', '.join(allowed)}")
    return items
