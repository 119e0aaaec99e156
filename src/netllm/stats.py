"""Spread and paired comparisons over training seeds, the way every benchmark reports them.

    spread({0: 9.1, 1: 9.3, 2: 9.2})                 # mean, std (n-1), n, values
    paired_difference(netllm, lstm, "lower")         # mean of a[k] - b[k] with a 95 % t interval

A paired difference is taken key by key (a training seed; the same test data on both
sides), so what the two policies share — the test windows, traces or job sequences —
cancels. The interval is Student's t over the per-key differences: with 3 training seeds
it is wide (t = 4.30), which is the honest answer for 3 seeds.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from netllm.utils import NetLLMError


def spread(values: Mapping[Any, float]) -> dict[str, Any]:
    """``{"mean", "std", "n", "values"}``; ``std`` is the sample std (n - 1), 0 for one value."""
    xs = [float(v) for v in values.values()]
    if not xs:
        raise NetLLMError("spread: no values")
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(xs), "values": {str(k): float(v) for k, v in values.items()}}


def t_interval(diffs: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Student's t interval of the mean of ``diffs``; None for fewer than two values."""
    if len(diffs) < 2:
        return None
    from scipy import stats

    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1)) * sd / math.sqrt(len(diffs))
    return mean - half, mean + half


def paired_difference(a: Mapping[Any, float], b: Mapping[Any, float], better: str,
                      confidence: float = 0.95) -> dict[str, Any]:
    """``a - b`` key by key (the keys must match) with its ``confidence`` t interval.

    ``better`` is "lower" or "higher" (the metric's direction); ``a_better`` says whether
    the whole interval lies on ``a``'s good side of zero (None with one key: no interval).
    """
    if better not in ("lower", "higher"):
        raise NetLLMError(f"paired_difference: better must be 'lower' or 'higher', got {better!r}")
    if set(a) != set(b):
        raise NetLLMError(f"paired_difference: keys differ ({sorted(a)} vs {sorted(b)}); pair the same seeds")
    if not a:
        raise NetLLMError("paired_difference: nothing to pair")
    keys = sorted(a)
    diffs = [float(a[k]) - float(b[k]) for k in keys]
    mean = sum(diffs) / len(diffs)
    interval = t_interval(diffs, confidence)
    verdict = None
    if interval is not None:
        verdict = interval[1] < 0 if better == "lower" else interval[0] > 0
    return {"mean": mean, "n": len(diffs), "per_key": {str(k): d for k, d in zip(keys, diffs)},
            "confidence": confidence, "ci": list(interval) if interval else None, "a_better": verdict,
            "better": better}


def describe(diff: Mapping[str, Any], unit: str = "") -> str:
    """One line: ``-0.21 (95 % CI -0.35 .. -0.07, n=3)``."""
    ci = diff.get("ci")
    text = f"{diff['mean']:+.3f}{unit}"
    if ci:
        text += f" ({100 * diff['confidence']:.0f} % CI {ci[0]:+.3f} .. {ci[1]:+.3f}, n={diff['n']})"
    else:
        text += f" (n={diff['n']}: no interval)"
    return text
