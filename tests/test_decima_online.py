"""The control of CJS online fine-tuning: the same PPO on Decima's own network
(``netllm finetune cjs --adapter decima``, ``tasks/cjs/decima_online.py``). Synthetic jobs
and random GNN weights: no data needed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from netllm.tasks.cjs.baselines import DecimaScheduler
from netllm.tasks.cjs.decima import build_decima
from netllm.finetune import timed_returns
from netllm.tasks.cjs.decima_online import WEIGHTS, finetune_decima, log_probs, rollout, update
from netllm.tasks.cjs.jobs import synthetic_templates
from netllm.tasks.cjs.sim import CJSConfig
from netllm.tasks.cjs.task import TASK, CJSFinetuneOptions
from netllm.tasks.cjs.vec import run_episodes

TEMPLATES = synthetic_templates(6, seed=3)
TRAIN = CJSConfig(num_executors=10, num_jobs=4, arrival_rate=4e-4)
VALID = [1001, 1002]


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_decima().state_dict().items()}


def options(**kw):
    o = CJSFinetuneOptions(adapter="decima", envs=4, group=2, batch_size=1, lr=1e-3, epochs=1, **kw)
    o.check()
    return o


def run(weights, out, iterations, resume=False):
    return finetune_decima(options(iterations=iterations), out, lambda it: [500 + 4 * it + j for j in range(4)],
                           TRAIN, TRAIN, VALID, resume=resume, progress=False, templates=TEMPLATES, weights=weights)


def test_timed_returns_per_episode():
    rewards, bounds = np.array([1.0, 2.0, 3.0, 10.0, 20.0]), (np.array([0, 3]), np.array([3, 5]))
    times = np.array([0.0, 10.0, 30.0, 5.0, 15.0])
    assert timed_returns(rewards, times, bounds, 0.0).tolist() == [6.0, 5.0, 3.0, 30.0, 20.0]
    # halving every 10 s: 3 is 20 s after the second decision, 30 s after the first
    assert timed_returns(rewards, times, bounds, 10.0).tolist() == pytest.approx([1 + 1 + 3 / 8, 2 + 3 / 4, 3,
                                                                                  10 + 10, 20])


def test_ppo_moves_the_policy_towards_better_than_the_group(weights):
    """One update raises the log-probability of the decisions that did better than their
    group and lowers that of the others: the sign of the whole objective."""
    net, ref = build_decima(weights), build_decima(weights)
    batch = rollout(net, [11, 12, 13, 14], 2, TRAIN, TEMPLATES)
    assert len(batch["obs"]) > 20 and abs(float(batch["adv"].mean())) < 1e-5
    with torch.no_grad():
        before, _ = log_probs(net, batch["obs"], batch["stage"], batch["limit"])
    assert torch.allclose(before, batch["old"], atol=1e-5)  # recorded as the policy that acted
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    update(net, ref, optimizer, batch, options(kl_coef=0.0, entropy_coef=0.0), 1)
    with torch.no_grad():
        after, _ = log_probs(net, batch["obs"], batch["stage"], batch["limit"])
    moved = after - before
    assert float((moved * batch["adv"]).mean()) > 0
    good, bad = batch["adv"] > 0.5, batch["adv"] < -0.5
    assert float(moved[good].mean()) > float(moved[bad].mean())


def test_group_episodes_share_jobs_not_draws(weights):
    batch_net = build_decima(weights)
    from netllm.tasks.cjs.decima_online import _Recorder

    rec = _Recorder(batch_net)
    results = run_episodes(rec, [21, 22, 23], TRAIN, templates=TEMPLATES, sequences=[21, 21, 23])
    first, second = rec.episodes[21], rec.episodes[22]
    jobs = [[(r.query, r.arrival_ms) for r in res.records] for res in results]
    assert jobs[0] == jobs[1] and jobs[0] != jobs[2]
    assert first["stage"] != second["stage"] or first["limit"] != second["limit"]


def test_run_validates_keeps_the_best_and_resumes_exactly(weights, tmp_path):
    straight = run(weights, tmp_path / "straight", 2)
    run(weights, tmp_path / "resumed", 1)
    resumed = run(weights, tmp_path / "resumed", 2, resume=True)
    a = torch.load(straight / "train" / "checkpoint" / "state.pt", weights_only=True)["net"]
    b = torch.load(resumed / "train" / "checkpoint" / "state.pt", weights_only=True)["net"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], weights[k]) for k in a)  # it learned something
    rows = [line.split(",") for line in (straight / "metrics.csv").read_text().splitlines()]
    table = [dict(zip(rows[0], r)) for r in rows[1:]]
    assert (resumed / "metrics.csv").read_text().count("\n") == len(rows)
    # the first row is the starting weights, played as netllm eval plays Decima: the reference
    start = DecimaScheduler(state_dict=weights)
    expected = np.mean([r.avg_jct_s for r in run_episodes(start, VALID, TRAIN, templates=TEMPLATES)])
    assert float(table[0]["valid_jct_s"]) == pytest.approx(expected) == float(table[0]["reference_jct_s"])
    record = json.loads((straight / "decima.json").read_text())
    scores = [float(t["valid_jct_s"]) for t in table if t["valid_jct_s"]]
    assert record["best"]["valid_jct_s"] == pytest.approx(min(scores))
    # the kept weights load as a policy of netllm eval cjs
    policy = TASK.policy_from_run(straight, None)
    kept = torch.load(straight / WEIGHTS, weights_only=True)
    assert policy.name == "decima-finetuned"
    assert all(torch.equal(policy.net.state_dict()[k], kept[k]) for k in kept)


def test_cli_decima_needs_a_group(tmp_path, capsys):
    from netllm.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["finetune", "cjs", "--adapter", "decima", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "--group" in err[0], err
    assert not out.exists()


def test_group_returns_discount_by_half_life_else_gamma():
    from netllm.finetune import FinetuneOptions, group_returns

    rewards, bounds = np.array([1.0, 2.0, 3.0, 10.0, 20.0]), (np.array([0, 3]), np.array([3, 5]))
    times = np.array([0.0, 10.0, 30.0, 5.0, 15.0])
    assert group_returns(rewards, times, bounds, FinetuneOptions()).tolist() == [6.0, 5.0, 3.0, 30.0, 20.0]
    assert group_returns(rewards, times, bounds, FinetuneOptions(gamma=0.5)).tolist() == [
        1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3, 10 + 0.5 * 20, 20]
    # --half-life wins over --gamma
    assert group_returns(rewards, times, bounds, FinetuneOptions(gamma=0.5, half_life=10.0)).tolist() == \
        pytest.approx(timed_returns(rewards, times, bounds, 10.0).tolist())


def test_cli_decima_refuses_workers_before_writing(tmp_path, capsys):
    from netllm.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["finetune", "cjs", "--adapter", "decima", "--group", "2", "--workers", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "one process" in err[0], err
    assert not out.exists()

