"""Online fine-tuning (``netllm.finetune``, CJS hooks in ``tasks/cjs/online.py``): tiles,
GAE, PPO iterations that write a loadable adapter, exact resume, and bad input (tiny
random Llama, synthetic jobs, random-weight GNN)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from netllm.finetune import FinetuneOptions, check_run_folder, gae, group_advantages, run_finetune, tiles
from netllm.model import NetLLM
from netllm.rl import ExperiencePool
from netllm.tasks.cjs.baselines import make_scheduler
from netllm.tasks.cjs.features import load_gnn
from netllm.tasks.cjs.jobs import synthetic_templates
from netllm.tasks.cjs.online import CJSOnline
from netllm.tasks.cjs.policy import NetLLMCJSPolicy, model_config
from netllm.tasks.cjs.sim import CJSConfig
from netllm.tasks.cjs.vec import run_episodes
from netllm.utils import NetLLMError

TEMPLATES = synthetic_templates(6, seed=3)
TRAIN = CJSConfig(num_executors=10, num_jobs=4, arrival_rate=4e-4)


def toy_pool(lengths: list[int]) -> ExperiencePool:
    episodes = [{"states": {"x": np.zeros((n, 1))}, "actions": np.zeros(n), "rewards": np.ones(n)} for n in lengths]
    return ExperiencePool.from_episodes(episodes)


def test_tiles_cover_every_step_once():
    pool = toy_pool([7, 3, 4])
    ends, score = tiles(pool, 3)
    rows = ends[:, None] + np.arange(-2, 1)[None, :]
    scored = np.sort(rows[score])
    assert np.array_equal(scored, np.arange(len(pool)))
    starts, stops = pool.episode_bounds
    for e, m in zip(ends, score):  # a tile never scores a step of another episode
        episode = np.searchsorted(stops, e, side="right")
        assert (rows[list(ends).index(e)][m] >= starts[episode]).all()


def test_gae_by_hand():
    rewards = np.array([1.0, 2.0, 3.0, 10.0])
    values = np.array([0.5, 0.5, 0.5, 1.0])
    dones = np.array([False, False, True, True])
    adv, target = gae(rewards, values, dones, gamma=0.9, lam=0.5)
    d2 = 3.0 - 0.5
    d1 = 2.0 + 0.9 * 0.5 - 0.5
    d0 = 1.0 + 0.9 * 0.5 - 0.5
    assert adv[2] == pytest.approx(d2)
    assert adv[1] == pytest.approx(d1 + 0.45 * d2)
    assert adv[0] == pytest.approx(d0 + 0.45 * (d1 + 0.45 * d2))
    assert adv[3] == pytest.approx(10.0 - 1.0)  # a new episode: nothing bootstraps across
    assert np.allclose(target, adv + values)


def test_group_advantages_by_hand():
    # one group of two episodes on the same input: e0 decides at 0, 1, 3 s; e1 at 0, 2 s
    pool = toy_pool([3, 2])
    pool.rewards[:] = [-1.0, -2.0, -3.0, -4.0, -2.0]
    times = np.array([0.0, 1.0, 3.0, 0.0, 2.0])
    bounds = pool.episode_bounds
    ret = pool.returns_to_go()
    assert np.allclose(ret, [-6, -5, -3, -6, -2])
    adv = group_advantages(ret, times, bounds, np.array([0, 0]))
    e1_at = {0.0: -6.0, 1.0: -4.0, 3.0: 0.0}  # e1's return-to-go interpolated (0 after its last decision)
    e0_at = {0.0: -6.0, 2.0: -4.0}
    assert np.allclose(adv[:3], [r - (r + e1_at[t]) / 2 for r, t in zip(ret[:3], times[:3])])
    assert np.allclose(adv[3:], [r - (e0_at[t] + r) / 2 for r, t in zip(ret[3:], times[3:])])
    with pytest.raises(NetLLMError, match="one episode"):
        group_advantages(ret, times, bounds, np.array([0, 1]))


@pytest.fixture(scope="module")
def offline(tiny_llama, tmp_path_factory):
    """A tiny CJS adapter that decides something (its weights nudged away from init)."""
    torch.manual_seed(0)
    model = NetLLM(model_config(llm=tiny_llama, layers=2, rank=4, context=4, gnn="random"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("offline")
    model.save_adapter(folder, extra={"target_return": -0.5, "recipe": {"decode": "sample"}})
    return folder


def finetune(offline, out, iterations, resume=False, group=1, reference=None, half_life=0.0):
    options = FinetuneOptions(adapter=str(offline), iterations=iterations, envs=2, batch_size=4, lr=1e-3, epochs=1,
                              half_life=half_life)
    options.check()
    model = NetLLM.from_adapter(offline, task="cjs")
    ref = NetLLM.from_adapter(offline, task="cjs", merge=True)
    hooks = CJSOnline(load_gnn("random"), -0.5, TRAIN, TRAIN, [1001, 1002], templates=TEMPLATES, group=group,
                      reference=reference)
    return run_finetune(model, ref, hooks, options, out, seeds_of=lambda it: [500 + 2 * it, 501 + 2 * it],
                        extra={"target_return": -0.5, "recipe": {"decode": "sample"}}, resume=resume,
                        progress=False)


def test_ppo_iterations_write_an_adapter_eval_loads(offline, tmp_path):
    out = finetune(offline, tmp_path / "ppo", iterations=2)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and "kl" in rows[0] and "valid_jct_s" in rows[0]
    offline_row = dict(zip(rows[0].split(","), rows[1].split(",")))
    assert offline_row["iteration"] == "0" and offline_row["valid_jct_s"] and not offline_row["loss"]
    first = dict(zip(rows[0].split(","), rows[2].split(",")))
    assert float(first["clip_frac"]) >= 0 and np.isfinite(float(first["loss"]))
    assert float(first["decisions"]) > 0
    assert (out / "learning_curve.png").stat().st_size > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert "value" in config["heads"] and config["extra"]["best"]["step"] in (0, 1, 2)
    valid = [float(dict(zip(rows[0].split(","), r.split(",")))["valid_jct_s"]) for r in rows[1:]]
    assert config["extra"]["best"]["jct_s"] == pytest.approx(min(valid))  # the offline adapter competes
    policy = NetLLMCJSPolicy.from_adapter(out, device="cpu", gnn=load_gnn("random"))
    assert policy.sample  # decoded as the offline adapter was validated
    result = run_episodes(policy, [7], TRAIN, templates=TEMPLATES)[0]
    assert np.isfinite(result.avg_jct_s)
    trained = load_file(str(out / "train" / "checkpoint" / "model.safetensors"))
    start = load_file(str(offline / "netllm_modules.safetensors"))
    assert any(not torch.equal(trained[k], start[k]) for k in start if k in trained)  # it learned something


def test_interrupted_and_resumed_run_ends_with_the_same_weights(offline, tmp_path):
    straight = finetune(offline, tmp_path / "straight", iterations=2)
    finetune(offline, tmp_path / "resumed", iterations=1)
    resumed = finetune(offline, tmp_path / "resumed", iterations=2, resume=True)
    a = load_file(str(straight / "train" / "checkpoint" / "model.safetensors"))
    b = load_file(str(resumed / "train" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (straight / "metrics.csv").read_text().count("\n") == (resumed / "metrics.csv").read_text().count("\n")
    walls = [float(line.split(",")[header.index("wall_s")]) for header in
             [(resumed / "metrics.csv").read_text().splitlines()[0].split(",")]
             for line in (resumed / "metrics.csv").read_text().splitlines()[1:]]
    assert walls == sorted(walls) and walls[-1] > walls[1]  # the clock goes on across the resume


def test_group_rollouts_share_a_job_sequence_with_their_own_draws(offline, tmp_path):
    model = NetLLM.from_adapter(offline, task="cjs")
    hooks = CJSOnline(load_gnn("random"), -0.5, TRAIN, TRAIN, [1001], templates=TEMPLATES, group=2)
    roll = hooks.rollout(model, [600, 601, 602, 603])
    assert list(roll.groups) == [0, 0, 1, 1] and len(roll.times) == len(roll.pool)
    starts, ends = roll.pool.episode_bounds
    for s, e in zip(starts, ends):
        assert np.all(np.diff(roll.times[s:e]) >= 0)
    policy = NetLLMCJSPolicy(model, -0.5, load_gnn("random"), temperature=1.0)
    results = run_episodes(policy, [600, 601, 602], TRAIN, templates=TEMPLATES, sequences=[600, 600, 602])
    arrivals = [[r.arrival_ms for r in res.records] for res in results]
    assert arrivals[0] == arrivals[1] != arrivals[2]  # the group's input is the same job sequence
    alone = run_episodes(policy, [601], TRAIN, templates=TEMPLATES, sequences=[600])[0]
    assert alone.avg_jct_s == results[1].avg_jct_s  # its draws are its own seed's, whoever plays beside it
    fifo = make_scheduler("fifo")
    out = finetune(offline, tmp_path / "grouped", iterations=1, group=2, reference=("fifo", fifo), half_life=30.0)
    rows = (out / "metrics.csv").read_text().splitlines()
    last = dict(zip(rows[0].split(","), rows[-1].split(",")))
    assert last["iteration"] == "1" and np.isfinite(float(last["policy_loss"]))
    first = dict(zip(rows[0].split(","), rows[1].split(",")))  # the imitated policy, scored once beside
    want = np.mean([r.avg_jct_s for r in run_episodes(fifo, [1001, 1002], TRAIN, templates=TEMPLATES)])
    assert first["reference"] == "fifo" and float(first["reference_jct_s"]) == pytest.approx(want)
    with pytest.raises(NetLLMError, match="--group 2"):
        hooks.rollout(model, [600, 601, 602])


def test_resume_refuses_another_runs_folder(offline, tmp_path):
    out = tmp_path / "ppo"
    finetune(offline, out, iterations=1)
    other = FinetuneOptions(adapter=str(offline), iterations=2, envs=3)
    with pytest.raises(NetLLMError, match="another run.*envs"):
        check_run_folder(out, other, resume=True)
    with pytest.raises(NetLLMError, match="--resume"):
        check_run_folder(out, other, resume=False)
    # an option added after the run started is no difference while it keeps its default
    from netllm.tasks.cjs.task import CJSFinetuneOptions

    same = dict(adapter=str(offline), iterations=5, envs=2, batch_size=4, lr=1e-3, epochs=1)
    stored = json.loads((out / "train/checkpoint/trainer_state.json").read_text())
    for key in ("jobs", "executors", "valid_seeds", "valid_jobs", "group"):
        assert key not in stored["config"]
    check_run_folder(out, CJSFinetuneOptions(**same), resume=True)
    with pytest.raises(NetLLMError, match="another run.*group"):
        check_run_folder(out, CJSFinetuneOptions(**same, group=2), resume=True)


def test_cli_bad_adapters_are_one_line_errors_and_write_nothing(tiny_llama, offline, tmp_path, capsys):
    from netllm.cli import main

    vp = tmp_path / "vp-adapter"  # a prediction task's adapter (its config is all the check reads)
    vp.mkdir()
    (vp / "adapter_config.json").write_text(json.dumps({"task": "vp", "llm": tiny_llama, "encoders": [], "heads": {},
                                                        "lora": {}}))
    for adapter, needle in ((vp, "not a cjs policy"), (tmp_path / "none", "--adapter")):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as stop:
            main(["finetune", "cjs", "--adapter", str(adapter), "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and needle in err[0], err
        assert not out.exists()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["finetune", "cjs", "--adapter", str(offline), "--out", str(out), "--envs", "8", "--group", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "--group 3" in err[0], err
    assert not out.exists()


def test_abr_ppo_iteration_on_fcc_like_and_generated_traces(tiny_llama, tmp_path):
    """ABR's hooks: rollouts on training traces plus freshly generated ones, an adapter
    eval loads, and the return-to-go of each decision is the target minus what came before."""
    from netllm.tasks.abr.online import ABROnline
    from netllm.tasks.abr.task import NetLLMABRPolicy, evaluate, model_config as abr_config
    from netllm.tasks.abr.traces import synthetic_traces, synthetic_video

    torch.manual_seed(0)
    model = NetLLM(abr_config(llm=tiny_llama, layers=2, rank=4, context=4))
    offline = tmp_path / "offline"
    model.save_adapter(offline, extra={"target_return": 30.0})
    video = synthetic_video(seed=0, num_chunks=12)
    hooks = ABROnline(30.0, synthetic_traces(4, seed=3), [video], synthetic_traces(2, seed=9), [video], envs=2,
                      generated=2, high_mbps=30.0)
    roll = hooks.rollout(NetLLM.from_adapter(offline, task="abr"), [5])
    assert roll.pool.num_episodes == 4  # 2 training traces + 2 generated
    first = roll.pool.episode_bounds[0][1]
    scale = model.config.rl.return_scale
    assert roll.rtg[0] == pytest.approx(30.0 / scale)
    assert roll.rtg[1] == pytest.approx((30.0 - roll.pool.rewards[0]) / scale, rel=1e-5)
    assert roll.rtg[first] == pytest.approx(30.0 / scale)  # a new episode starts at the target
    options = FinetuneOptions(adapter=str(offline), iterations=1, envs=2, batch_size=4, lr=1e-3, epochs=1)
    out = run_finetune(NetLLM.from_adapter(offline, task="abr"), NetLLM.from_adapter(offline, task="abr", merge=True),
                       hooks, options, tmp_path / "ppo", seeds_of=lambda it: [it], extra={"target_return": 30.0},
                       progress=False)
    policy = NetLLMABRPolicy.from_adapter(out, device="cpu")
    assert np.isfinite(evaluate(policy, synthetic_traces(2, seed=11), video, [1]).mean)


def test_abr_validation_over_several_videos_and_generated_traces(tiny_llama, tmp_path):
    """--valid-video video1,video2 --valid-generated N: the score is the mean over every
    (trace, video) episode, and the generated traces come from a seed no iteration draws."""
    from netllm.tasks.abr.online import ITERATION_SEED, VALID_GENERATED_SEED, ABROnline
    from netllm.tasks.abr.task import NetLLMABRPolicy, evaluate, model_config as abr_config
    from netllm.tasks.abr.traces import synthetic_traces, synthetic_video

    torch.manual_seed(0)
    model = NetLLM(abr_config(llm=tiny_llama, layers=2, rank=4, context=4))
    videos = [synthetic_video(seed=0, num_chunks=12), synthetic_video(seed=1, num_chunks=12)]
    hooks = ABROnline(30.0, synthetic_traces(4, seed=3), videos[:1], synthetic_traces(2, seed=9), videos, envs=2,
                      low_mbps=0.5, high_mbps=30.0, valid_generated=3)
    assert len(hooks.valid) == 5
    drawn = synthetic_traces(3, seed=VALID_GENERATED_SEED, low_mbps=0.5, high_mbps=30.0)
    assert all(np.array_equal(a.bandwidth_mbps, b.bandwidth_mbps) for a, b in zip(hooks.valid[2:], drawn))
    assert VALID_GENERATED_SEED < ITERATION_SEED  # ABRTask.finetune's iterations draw from ITERATION_SEED up
    per_video = [evaluate(NetLLMABRPolicy(model, 30.0), hooks.valid, v, [1]).mean for v in videos]
    assert per_video[0] != pytest.approx(per_video[1])  # both videos count, not one twice
    assert hooks.validate(model) == pytest.approx(float(np.mean(per_video)), rel=1e-6)
