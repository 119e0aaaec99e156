"""Spread over training seeds and paired comparisons (netllm.stats, netllm.results)."""

from __future__ import annotations

import json
import math

import pytest

from netllm.results import combine_train_seeds, comparisons
from netllm.stats import describe, paired_difference, spread, t_interval
from netllm.tasks.base import Metrics
from netllm.utils import NetLLMError


def test_spread_uses_the_sample_std():
    s = spread({0: 1.0, 1: 2.0, 2: 3.0})
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["n"] == 3
    assert spread({5: 4.0})["std"] == 0.0


def test_the_bench_tables_std_is_the_same_sample_std():
    # "mean ± std" in `netllm bench` / `eval` tables and results.json: n - 1, like spread
    m = Metrics("qoe", True, {0: 1.0, 1: 2.0, 2: 3.0})
    assert m.std == 1.0 and m.summary()["std"] == 1.0
    assert Metrics("qoe", True, {1: 0.5}).std == 0.0


def test_t_interval_matches_the_textbook_value():
    # mean 2, sd 1, n 3: half width = t(0.975, 2) * 1 / sqrt(3) = 4.3027 / 1.7321
    lo, hi = t_interval([1.0, 2.0, 3.0])
    assert (hi - lo) / 2 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert t_interval([1.0]) is None


def test_paired_difference_pairs_key_by_key_and_gives_a_verdict():
    a = {0: 9.0, 1: 9.2, 2: 9.1}
    b = {0: 9.5, 1: 9.6, 2: 9.6}
    d = paired_difference(a, b, "lower")
    assert d["mean"] == pytest.approx(-1.4 / 3)
    assert d["per_key"] == {"0": pytest.approx(-0.5), "1": pytest.approx(-0.4), "2": pytest.approx(-0.5)}
    assert d["ci"][1] < 0 and d["a_better"] is True
    assert paired_difference(a, b, "higher")["a_better"] is False
    noisy = paired_difference({0: 1.0, 1: 3.0}, {0: 2.0, 1: 1.0}, "higher")
    assert noisy["ci"][0] < 0 < noisy["ci"][1] and noisy["a_better"] is False
    assert paired_difference({0: 1.0}, {0: 2.0}, "lower")["a_better"] is None
    assert "CI" in describe(d) and "no interval" in describe(paired_difference({0: 1.0}, {0: 2.0}, "lower"))
    with pytest.raises(NetLLMError, match="keys differ"):
        paired_difference({0: 1.0, 1: 1.0}, {0: 1.0, 2: 1.0}, "lower")


def _m(per_seed, higher=True):
    return Metrics("qoe", higher, dict(per_seed), parts={"bitrate_mbps": sum(per_seed.values())})


def test_combine_over_training_seeds_and_compare_with_a_baseline_that_does_not_train():
    runs = {0: _m({1: 1.0, 2: 1.2}), 1: _m({1: 0.8, 2: 1.0}), 2: _m({1: 1.1, 2: 1.1})}
    combined = combine_train_seeds(runs)
    assert combined.per_seed == {0: pytest.approx(1.1), 1: pytest.approx(0.9), 2: pytest.approx(1.1)}
    assert combined.info["paired_over"] == "training seeds"
    assert combined.summary()["eval_std_per_train_seed"]["0"] == pytest.approx(0.1 * math.sqrt(2))  # sample std
    control = combine_train_seeds({0: _m({1: 0.9, 2: 0.9}), 1: _m({1: 0.9, 2: 0.7}), 2: _m({1: 1.0, 2: 1.0})})
    baseline = _m({1: 0.5, 2: 0.7})  # evaluation seeds 1, 2: its mean stands for every training seed
    results = {"netllm": combined, "random-init": control, "mpc": baseline}
    comps = comparisons(results, "netllm", ["mpc", "random-init"], trained=["netllm", "random-init"])
    assert comps["netllm - mpc"]["per_key"] == {"0": pytest.approx(0.5), "1": pytest.approx(0.3),
                                                "2": pytest.approx(0.5)}
    assert comps["netllm - mpc"]["paired_over"] == "training seeds" and comps["netllm - mpc"]["a_better"]
    assert comps["netllm - random-init"]["per_key"]["1"] == pytest.approx(0.1)


def test_one_training_seed_pairs_over_the_evaluation_seeds():
    single = combine_train_seeds({0: _m({1: 1.0, 2: 1.2, 3: 1.1})})
    assert single.per_seed == {1: 1.0, 2: 1.2, 3: 1.1} and single.info["paired_over"] == "evaluation seeds"
    comps = comparisons({"netllm": single, "bba": _m({1: 0.9, 2: 1.0, 3: 1.05})}, "netllm", ["bba"],
                        trained=["netllm"])
    assert comps["netllm - bba"]["n"] == 3 and comps["netllm - bba"]["paired_over"] == "evaluation seeds"


def test_one_training_and_one_evaluation_seed_pair_trace_by_trace():
    def run(qoes, seed=1):
        rows = [{"seed": seed, "trace": f"t{i}", "qoe": q} for i, q in enumerate(qoes)]
        return Metrics("qoe", True, {seed: sum(qoes) / len(qoes)}, rows=rows)

    netllm = combine_train_seeds({0: run([1.0, 1.2, 0.9, 1.1])})
    bba = run([0.8, 1.1, 0.7, 1.0])
    comps = comparisons({"netllm": netllm, "bba": bba}, "netllm", ["bba"], trained=["netllm"], units="trace")
    c = comps["netllm - bba"]
    assert c["n"] == 4 and c["paired_over"] == "traces, 1 training seed"
    assert c["per_key"] == {"1/t0": pytest.approx(0.2), "1/t1": pytest.approx(0.1), "1/t2": pytest.approx(0.2),
                            "1/t3": pytest.approx(0.1)}
    assert c["ci"][0] > 0 and c["a_better"] is True
    # without units, or where the traces differ, it stays one pair with no interval
    plain = comparisons({"netllm": netllm, "bba": bba}, "netllm", ["bba"], trained=["netllm"])["netllm - bba"]
    assert plain["n"] == 1 and plain["ci"] is None and plain["paired_over"] == "evaluation seeds"
    other = run([0.8, 1.1, 0.7])
    assert comparisons({"netllm": netllm, "bba": other}, "netllm", ["bba"], trained=["netllm"],
                       units="trace")["netllm - bba"]["n"] == 1
    # a repeated trace name cannot pair item by item
    twice = Metrics("qoe", True, {1: 1.0}, rows=[{"seed": 1, "trace": "t0", "qoe": 1.0}] * 2)
    assert comparisons({"netllm": twice, "bba": twice}, "netllm", ["bba"], trained=["netllm"],
                       units="trace")["netllm - bba"]["n"] == 1


def test_cached_metrics_reuses_a_result_only_under_the_same_key(tmp_path):
    from netllm.results import cached_metrics

    calls = []

    def compute(value):
        calls.append(value)
        return Metrics("qoe", True, {1: value, 2: value + 1}, parts={"rebuffer_s": 0.5},
                       rows=[{"seed": 1, "trace": "a", "qoe": value}])

    first = cached_metrics(tmp_path / "cache", "policy x on set y", lambda: compute(1.0))
    again = cached_metrics(tmp_path / "cache", "policy x on set y", lambda: compute(9.0))
    assert calls == [1.0]  # the second call was answered from the cache
    assert again.per_seed == first.per_seed == {1: 1.0, 2: 2.0}
    assert again.parts == first.parts and again.rows == first.rows and again.higher_is_better
    other = cached_metrics(tmp_path / "cache", "policy x on set z", lambda: compute(3.0))
    assert calls == [1.0, 3.0] and other.per_seed[1] == 3.0
    for f in (tmp_path / "cache").iterdir():  # a damaged entry is evaluated again, not trusted
        f.write_text("{not json")
    assert cached_metrics(tmp_path / "cache", "policy x on set y", lambda: compute(5.0)).per_seed[1] == 5.0
    assert cached_metrics(None, "policy x on set y", lambda: compute(7.0)).per_seed[1] == 7.0  # no cache


def test_adapter_digest_follows_the_weights(tmp_path):
    from netllm.model import ADAPTER_CONFIG, adapter_digest

    a = tmp_path / "a"
    a.mkdir()
    (a / ADAPTER_CONFIG).write_text(json.dumps({"task": "abr", "llm": {}, "encoders": [], "heads": [], "lora": {}}))
    (a / "netllm_modules.safetensors").write_bytes(b"weights-1")
    (a / "metrics.csv").write_text("iteration\n1\n")
    d1 = adapter_digest(a)
    (a / "metrics.csv").write_text("iteration\n1\n2\n")  # not part of the policy
    assert adapter_digest(a) == d1
    (a / "netllm_modules.safetensors").write_bytes(b"weights-2")
    assert adapter_digest(a) != d1
    with pytest.raises(NetLLMError, match="not a NetLLM adapter folder"):
        adapter_digest(tmp_path)
