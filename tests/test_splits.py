"""The evaluation protocol: which data each task trains, validates and tests on, by content.

VP's splits are disjoint by construction (a test window is an unseen user on an unseen
video) and their files are distinct by sha256. CJS evaluates on job sequences (seeds)
apart from the pool's and the validation episode's. Upstream's ABR splits overlap —
every fcc-valid trace and 42 of the 100 fcc-test traces are byte-identical to fcc-train
traces — which is why `eval abr` reports `qoe_unseen` beside the whole set; this test
pins that overlap, so a change of the data is noticed. The project's own ABR protocol
splits fcc-train by content: fcc-pool (what pools play), fcc-holdout (what adapters are
chosen on), both apart from fcc-test.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from netllm.utils import parse_seeds


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_vp_splits_share_no_video_no_user_and_no_file(real_data):
    from netllm.tasks.vp.dataset import SPLITS

    for dataset, splits in SPLITS.items():
        names = list(splits)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                assert not set(splits[a][0]) & set(splits[b][0]), (dataset, a, b, "videos")
                assert not set(splits[a][1]) & set(splits[b][1]), (dataset, a, b, "users")
        files = {split: {_sha(f) for v in videos for f in (real_data / "vp/viewports" / dataset / f"video{v}").rglob("*.csv")
                         if any(f.name.endswith(f"_user{u}.csv") for u in users)}
                 for split, (videos, users) in splits.items()}
        assert all(files.values()), dataset
        assert not files["train"] & files["test"] and not files["train"] & files["valid"], dataset


def test_abr_upstream_overlap_is_pinned_and_unseen_excludes_it(real_data, monkeypatch):
    from netllm.tasks.abr.traces import copies_of, load_traces

    monkeypatch.setenv("NETLLM_DATA", str(real_data))
    train, valid, test = load_traces("fcc-train"), load_traces("fcc-valid"), load_traces("fcc-test")
    assert len(copies_of(valid, train)) == len(valid) == 150  # fcc-valid repeats fcc-train
    seen = copies_of(test, train)
    assert len(seen) == 42 and len(test) == 100
    assert not copies_of([t for t in test if t.name not in seen], train)


def test_cjs_pool_validation_and_test_seeds_are_apart():
    from netllm.tasks.cjs.task import CJSBenchOptions, CJSFinetuneOptions

    o = CJSBenchOptions()
    test, pool = set(parse_seeds(o.seeds)), set(parse_seeds(o.pool_seeds))
    assert not test & pool and o.eval_seed not in test | pool
    valid = set(parse_seeds(CJSFinetuneOptions().valid_seeds))  # 1001-1010: they chose the pool size and decoding
    assert valid and not pool & valid


def test_abr_demo_validates_on_traces_no_pool_or_test_uses(real_data, monkeypatch):
    from netllm.tasks.abr.task import demo_data
    from netllm.tasks.abr.traces import copies_of

    monkeypatch.setenv("NETLLM_DATA", str(real_data))
    d = demo_data(fetch=False)
    assert not copies_of(d.valid, d.train)
    assert dataclasses.is_dataclass(d) and d.real
    assert not copies_of(d.valid, d.test)  # else validation would peek at the test set
    assert len(d.valid) == 34  # fcc-train 201-235 less the one that fcc-test repeats
    assert not copies_of(d.train, d.test)


def test_abr_pool_holdout_and_test_sets_are_disjoint_by_content(real_data, monkeypatch):
    """The defaults of collect (fcc-pool), adapt's validation (fcc-holdout) and eval (fcc-test)."""
    from netllm.tasks.abr.task import ABRBenchOptions, ABRCollectOptions, ABREvalOptions, ABRRecipe
    from netllm.tasks.abr.traces import content_key, load_traces

    monkeypatch.setenv("NETLLM_DATA", str(real_data))
    assert ABRCollectOptions().traces == "fcc-pool" and ABRRecipe().valid_traces == "fcc-holdout"
    assert ABREvalOptions().traces == "fcc-test" and ABRBenchOptions().valid_traces == "fcc-holdout"
    sets = {name: {content_key(t) for t in load_traces(name)} for name in ("fcc-pool", "fcc-holdout", "fcc-test")}
    assert len(sets["fcc-pool"]) == 159 and len(sets["fcc-holdout"]) == 34 and len(sets["fcc-test"]) == 100
    assert not sets["fcc-pool"] & sets["fcc-holdout"]
    assert not sets["fcc-pool"] & sets["fcc-test"] and not sets["fcc-holdout"] & sets["fcc-test"]
    train = {content_key(t) for t in load_traces("fcc-train")}
    assert sets["fcc-pool"] | sets["fcc-holdout"] <= train
