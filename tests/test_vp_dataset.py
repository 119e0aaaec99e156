"""VP data: csv loader checks, splits, windows, yaw wrap-around, and the spec's baseline
numbers on the real Jin2022 / Wu2017 test splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from netllm.tasks.vp.baselines import LinearRegression, NoMotion, Velocity, make_baseline
from netllm.tasks.vp.dataset import (SPLITS, WindowSpec, angular_error, from_relative, load_samples, load_trace,
                                     load_traces, make_windows, relative, synthetic_traces, wrap)
from netllm.utils import NetLLMError


def write_csv(path: Path, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def good_rows(n: int = 5) -> list[str]:
    return [f"{0.2 * i:.3f},{i:.1f},{-i:.1f},{170 + 5 * i:.1f}" for i in range(n)]


def test_load_trace_reads_roll_pitch_yaw(tmp_path):
    trace = load_trace(write_csv(tmp_path / "u.csv", good_rows()))
    assert trace.shape == (5, 3)
    assert trace[2].tolist() == [2.0, -2.0, 180.0]


@pytest.mark.parametrize("rows, message", [
    (["0.0,1,2"], "expected 4 columns"),
    (["0.0,1,2,3", "0.2,1,abc,3"], ":2: non-numeric"),
    (["0.0,1,2,3", "0.2,1,nan,3"], ":2: NaN"),
    (["0.0,1,2,3", "0.0,1,2,3"], "timestamp does not increase"),
    ([], "empty viewport trace"),
])
def test_bad_csv_names_the_file_and_line(tmp_path, rows, message):
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(NetLLMError, match=message) as err:
        load_trace(path)
    assert "bad.csv" in str(err.value)


def test_angular_error_wraps_around():
    assert angular_error(np.array([179.0]), np.array([-179.0]))[0] == pytest.approx(2.0)
    assert angular_error(np.array([-170.0]), np.array([170.0]))[0] == pytest.approx(20.0)
    assert angular_error(np.array([10.0]), np.array([-10.0]))[0] == pytest.approx(20.0)


def test_relative_offsets_are_small_across_the_seam():
    history = np.array([[[0, 0, 170.0], [0, 0, 178.0], [0, 0, -176.0]]])
    future = np.array([[[0, 0, -170.0]]])
    rel_h, rel_f = relative(history, future)
    assert rel_h[0, :, 2].tolist() == pytest.approx([-14.0, -6.0, 0.0])
    assert rel_f[0, 0, 2] == pytest.approx(6.0)
    assert from_relative(history, rel_f)[0, 0, 2] == pytest.approx(-170.0)
    assert wrap(np.array([180.0, -180.0, 540.0])).tolist() == [-180.0, -180.0, -180.0]


def test_windows_follow_upstream_indexing():
    trace = np.arange(300 * 3, dtype=np.float64).reshape(300, 3)
    samples = make_windows({(1, 2): trace}, WindowSpec())
    starts = list(range(30, 300 - 60, 15))
    assert samples.t.tolist() == starts
    assert np.array_equal(samples.history[0], trace[20:30])
    assert np.array_equal(samples.future[-1], trace[starts[-1]:starts[-1] + 20])
    assert set(samples.video.tolist()) == {1} and set(samples.user.tolist()) == {2}


def test_window_larger_than_the_trace_is_an_error():
    with pytest.raises(NetLLMError, match="--hw/--fw.*do not fit"):
        make_windows({(1, 1): np.zeros((50, 3))}, WindowSpec(hw=10, fw=20))
    with pytest.raises(NetLLMError, match="--fw"):
        WindowSpec(fw=0)


def test_simple_baselines_on_a_known_motion():
    # constant yaw velocity of 2 deg/step, no wrap: velocity and LR are exact, no-motion lags
    hist = np.zeros((1, 10, 3))
    hist[0, :, 2] = 2.0 * np.arange(10)
    true = np.zeros((1, 20, 3))
    true[0, :, 2] = 2.0 * np.arange(10, 30)
    assert np.allclose(Velocity(20).predict(hist), true)
    assert np.allclose(LinearRegression(20).predict(hist), true)
    assert np.allclose(NoMotion(20).predict(hist)[0, :, 2], 18.0)


def test_unwrapped_variants_follow_a_turn_across_the_seam():
    hist = np.zeros((1, 10, 3))
    hist[0, :, 2] = wrap(170.0 + 2.0 * np.arange(10))  # crosses +180 -> -180
    raw = Velocity(20).predict(hist)[0, 0, 2]
    fair = Velocity(20, unwrapped=True).predict(hist)[0, 0, 2]
    assert angular_error(np.array([fair]), np.array([wrap(190.0)]))[0] < 1e-9
    assert angular_error(np.array([raw]), np.array([wrap(190.0)]))[0] > 10


def test_unknown_ids_name_the_option(tmp_path):
    with pytest.raises(NetLLMError, match="--dataset"):
        load_samples("Nope2020", "test")
    with pytest.raises(NetLLMError, match="--split"):
        load_samples("Jin2022", "dev")
    with pytest.raises(NetLLMError, match="--videos: unknown Jin2022 video 99"):
        load_traces("Jin2022", [99], [1], root=tmp_path)
    with pytest.raises(NetLLMError, match="--users: unknown Wu2017 user 60"):
        load_traces("Wu2017", [1], [60], root=tmp_path)
    with pytest.raises(NetLLMError, match="--policy: unknown VP baseline"):
        make_baseline("static")


def test_splits_are_disjoint():
    for dataset, splits in SPLITS.items():
        for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
            assert not set(splits[a][0]) & set(splits[b][0]), dataset
            assert not set(splits[a][1]) & set(splits[b][1]), dataset


def test_synthetic_traces_cut_into_windows():
    samples = make_windows(synthetic_traces(videos=2, users=2, length=200))
    assert samples.history.shape[1:] == (10, 3) and samples.future.shape[1:] == (20, 3)
    assert np.all(np.abs(samples.history[..., 2]) <= 180)


@pytest.mark.integration
@pytest.mark.parametrize("dataset, expected", [
    ("Jin2022", {"no-motion": 9.76, "velocity": 17.50, "lr": 19.47}),
    ("Wu2017", {"no-motion": 11.12}),
])
def test_baselines_match_the_spec_on_the_real_test_split(real_data, dataset, expected):
    samples = load_samples(dataset, "test", root=real_data)
    for name, mae in expected.items():
        pred = make_baseline(name).predict(samples.history)
        assert angular_error(pred, samples.future).mean() == pytest.approx(mae, abs=0.05), name


@pytest.mark.integration
def test_real_split_sizes(real_data):
    traces = load_traces("Jin2022", [4], [83, 15], root=real_data)
    assert all(t.shape == (300, 3) for t in traces.values())
    videos, users = SPLITS["Jin2022"]["test"]
    lengths = [len(t) for t in load_traces("Jin2022", videos, users, root=real_data).values()]
    assert len(load_samples("Jin2022", "test", root=real_data)) == sum(len(range(30, n - 60, 15)) for n in lengths)
