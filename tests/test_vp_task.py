"""NetLLM for VP end to end on a tiny random Llama and generated head motion: one-pass
prediction, training, the adapter round trip, the image token, the LSTM, the typed
options (one recipe, one-line errors before any work) and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from netllm.model import NetLLM
from netllm.recipe import load_policy
from netllm.tasks.vp.baselines import LSTMPredictor, LSTMRecipe, NoMotion, train_lstm
from netllm.tasks.vp.dataset import angular_error, make_windows, synthetic_traces
from netllm.tasks.vp.task import (TASK, NetLLMVPPolicy, VPAdaptOptions, VPBenchOptions, VPEvalOptions, VPRecipe,
                                  adapt, build_model, embed_steps, evaluate, model_config, predict_autoregressive,
                                  motion_side, predict_offsets, step_features)
from netllm.utils import NetLLMError


@pytest.fixture(scope="module")
def samples():
    return make_windows(synthetic_traces(videos=3, users=4, length=200, seed=0))


def test_untrained_model_is_the_no_motion_predictor(tiny_llama, samples):
    model = build_model(model_config(llm=tiny_llama, layers=2, rank=4), device="cpu")
    pred = NetLLMVPPolicy(model).predict(samples.history[:8])
    assert np.allclose(pred, NoMotion(20).predict(samples.history[:8]), atol=1e-5)


def test_one_pass_matches_the_head_shape_and_the_batch(tiny_llama, samples):
    model = build_model(model_config(llm=tiny_llama, layers=2, rank=4, fw=7), device="cpu")
    torch.nn.init.normal_(model.heads["future"].mlp[-1].weight, std=0.1)
    model.eval()
    feats = torch.as_tensor(step_features(samples.history[:6]))
    with torch.no_grad():
        whole = predict_offsets(model, feats)
        split = torch.cat([predict_offsets(model, feats[:3]), predict_offsets(model, feats[3:])])
    assert whole.shape == (6, 7, 3)
    assert torch.allclose(whole, split, atol=1e-5)
    with torch.no_grad():
        loop = predict_autoregressive(model, samples.history[:6], 7)
    assert loop.shape == (6, 7, 3)


def test_adapt_lowers_the_error_and_the_adapter_round_trips(tiny_llama, samples, tmp_path):
    recipe = VPRecipe(llm=tiny_llama, layers=2, rank=4, epochs=3, batch_size=16, lr=3e-3, eval_every=5,
                         warmup_steps=2)
    valid = samples.subset(slice(0, 40))
    folder = adapt(samples, tmp_path / "vp", recipe, valid=valid, device="cpu", progress=False)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task"] == "vp" and config["norm"]["fw"] == 20
    assert config["extra"]["best"]["mae"] <= evaluate(NoMotion(), valid)[0].mean + 1e-6
    policy = NetLLMVPPolicy.from_adapter(folder, device="cpu")
    again = NetLLMVPPolicy.from_adapter(folder, device="cpu")
    a, b = policy.predict(samples.history[:10]), again.predict(samples.history[:10])
    assert np.array_equal(a, b)
    metrics, horizon = evaluate(policy, valid)
    assert metrics.mean == pytest.approx(config["extra"]["best"]["mae"], abs=1e-4)
    assert horizon.shape == (20,) and horizon[-1] > horizon[0]  # farther is harder
    assert {"video", "user", "mae_deg"} <= set(metrics.rows[0])
    with pytest.raises(NetLLMError, match="adapter is for task 'vp', not 'abr'"):
        NetLLM.from_adapter(folder, task="abr", device="cpu")


def test_lora_mlp_adapts_the_mlp_projections_and_round_trips(tiny_llama, samples, tmp_path):
    def lora_modules(model):
        return {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}

    assert lora_modules(build_model(model_config(llm=tiny_llama, layers=2, rank=4), device="cpu")).isdisjoint(
        {"gate_proj", "up_proj", "down_proj"})
    assert VPRecipe().lora_mlp  # the recipe chosen on the valid splits; --no-lora-mlp: attention only
    recipe = VPRecipe(llm=tiny_llama, layers=2, rank=4, steps=3, batch_size=8, eval_every=0, warmup_steps=0)
    folder = adapt(samples, tmp_path / "vp", recipe, device="cpu", progress=False)
    model = NetLLM.from_adapter(folder, task="vp", device="cpu")
    assert {"gate_proj", "up_proj", "down_proj", "q_proj"} <= lora_modules(model)
    assert TASK.model_config(recipe).lora.mlp


def test_head_skip_reads_the_observed_motion_and_round_trips(tiny_llama, samples, tmp_path):
    assert not VPRecipe().head_skip
    model = build_model(model_config(llm=tiny_llama, layers=2, rank=4, head_skip=True), device="cpu")
    assert model.heads["future"].side_dim == 10 * 2 * 3  # hw x (offset, step) x 3 angles
    pred = NetLLMVPPolicy(model).predict(samples.history[:8])  # still starts as no-motion
    assert np.allclose(pred, NoMotion(20).predict(samples.history[:8]), atol=1e-5)
    recipe = VPRecipe(llm=tiny_llama, layers=2, rank=4, steps=3, batch_size=8, eval_every=0, warmup_steps=0,
                      head_skip=True)
    folder = adapt(samples, tmp_path / "vp", recipe, device="cpu", progress=False)
    policy = NetLLMVPPolicy.from_adapter(folder, device="cpu")
    assert policy.model.heads["future"].side_dim == 60
    feats = torch.as_tensor(step_features(samples.history[:4]))
    moved = feats.clone()
    moved[:, :, 2] += 0.5  # other steps, same LLM input otherwise: the skip path sees it
    with torch.no_grad():
        head = policy.model.heads["future"]
        hidden, _ = policy.model.hidden(embed_steps(policy.model, feats))
        assert not torch.allclose(head(hidden[:, -1], motion_side(feats)), head(hidden[:, -1], motion_side(moved)))
    assert TASK.model_config(recipe).heads["future"].side_dim == 60
    assert np.isfinite(policy.predict(samples.history[:4])).all()


def test_recurrent_head_decodes_step_by_step_and_round_trips(tiny_llama, samples, tmp_path):
    assert VPRecipe().head_decoder == "mlp"
    model = build_model(model_config(llm=tiny_llama, layers=2, rank=4, head_decoder="recurrent"), device="cpu")
    pred = NetLLMVPPolicy(model).predict(samples.history[:8])  # starts as no-motion too
    assert np.allclose(pred, NoMotion(20).predict(samples.history[:8]), atol=1e-5)
    recipe = VPRecipe(llm=tiny_llama, layers=2, rank=4, steps=3, batch_size=8, eval_every=0, warmup_steps=0,
                      lr=1e-2, head_decoder="recurrent")
    folder = adapt(samples, tmp_path / "vp", recipe, device="cpu", progress=False)
    policy = NetLLMVPPolicy.from_adapter(folder, device="cpu")
    assert policy.model.heads["future"].decoder == "recurrent"
    assert np.array_equal(policy.predict(samples.history[:6]),
                          NetLLMVPPolicy.from_adapter(folder, device="cpu").predict(samples.history[:6]))
    assert not np.allclose(policy.predict(samples.history[:6]), NoMotion(20).predict(samples.history[:6]))
    with pytest.raises(NetLLMError, match="--head-decoder"):
        VPAdaptOptions.build(head_decoder="gru")


def test_image_token_per_step_on_generated_frames(tmp_path, tiny_llama, samples):
    from transformers import ViTConfig

    vit = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=64)
    model = build_model(model_config(llm=tiny_llama, layers=2, rank=4, image=vit), device="cpu")
    frames = torch.rand(4, 10, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # generated frames
    feats = torch.as_tensor(step_features(samples.history[:4]))
    tokens = embed_steps(model, feats, frames)
    assert tokens.shape == (4, 20, model.hidden_size)  # viewport, frame, viewport, frame, ...
    torch.nn.init.normal_(model.heads["future"].mlp[-1].weight, std=0.1)
    out = predict_offsets(model, feats, frames)
    out.abs().mean().backward()
    vit_grads = [p.grad for p in model.encoders.encoders["frame"].vision.parameters()]
    assert all(g is None for g in vit_grads)  # the ViT stays frozen
    assert model.encoders.encoders["frame"].fc.weight.grad is not None
    model.save_adapter(tmp_path / "img")
    again = NetLLM.from_adapter(tmp_path / "img", device="cpu")
    with torch.no_grad():
        assert torch.allclose(predict_offsets(model.eval(), feats, frames), predict_offsets(again, feats, frames),
                              atol=1e-5)
    with pytest.raises(NetLLMError, match="frames are required"):
        predict_offsets(again, feats)


def test_lstm_trains_and_reloads(samples, tmp_path):
    recipe = LSTMRecipe(hidden=16, epochs=2, batch_size=32)
    lstm = train_lstm(samples, samples.subset(slice(0, 30)), recipe, tmp_path / "lstm", log=lambda *_: None)
    again = LSTMPredictor.load(tmp_path / "lstm")
    assert np.allclose(lstm.predict(samples.history[:5]), again.predict(samples.history[:5]))
    err = angular_error(again.predict(samples.history), samples.future)
    assert np.isfinite(err).all()


# ----------------------------------------------------------------------------- the recipe and the options


def test_one_recipe_holds_every_default():
    r = VPRecipe()
    assert (r.llm, r.layers, r.rank, r.batch_size, r.epochs, r.steps, r.lr, r.warmup_steps, r.weight_decay,
            r.schedule, r.eval_every, r.pretrained, r.seed) == (
        "smollm2", 6, 32, 64, None, 2000, 5e-4, 50, 0.01, "cosine", 100, True, 0)
    assert (r.dataset, r.hw, r.fw, r.step, r.augment, r.valid_stride) == ("both", 10, 20, 5, "mirror", 4)
    assert r.augmentations() == ("mirror",) and r.total_steps(75256) == 2000
    assert dataclasses.replace(r, epochs=2.0).total_steps(8820) == 276  # --epochs replaces --steps
    assert VPEvalOptions().step == 15  # training windows are denser than the evaluation's
    config = TASK.model_config(r)
    assert config.layers == 6 and config.lora.rank == 32 and config.lora.alpha == 64
    assert config.norm["hw"] == 10 and config.norm["fw"] == 20
    assert TASK.model_config(VPRecipe(fw=7)).heads["future"].steps == 7
    # adapt and bench share the recipe's defaults; eval's window defaults are the recipe's
    for cls in (VPAdaptOptions, VPBenchOptions):
        assert {f.name: getattr(cls(), f.name) for f in dataclasses.fields(VPRecipe)} == dataclasses.asdict(r)
    e = VPEvalOptions()
    assert (e.dataset, e.split, e.hw, e.fw, e.step) == ("Jin2022", "test", 10, 20, 15)
    lstm = VPAdaptOptions.build(model="lstm", hw=8, fw=5, seed=3, lstm_epochs=4).lstm_recipe()
    assert lstm == LSTMRecipe(epochs=4, hw=8, fw=5, seed=3, augment="mirror")  # the same data levers


@pytest.mark.parametrize("cls, values, needle", [
    (VPRecipe, {"hw": 0}, "--hw"),
    (VPRecipe, {"fw": "x"}, "--fw"),
    (VPRecipe, {"step": -1}, "--step"),
    (VPRecipe, {"dataset": "X"}, "--dataset"),
    (VPRecipe, {"epochs": 0}, "--epochs"),
    (VPRecipe, {"steps": 0}, "--steps"),
    (VPRecipe, {"lr": 0}, "--lr"),
    (VPRecipe, {"schedule": "step"}, "--schedule"),
    (VPAdaptOptions, {"model": "cnn"}, "--model"),
    (VPAdaptOptions, {"model": "lstm", "rank": 8}, "--rank"),  # a NetLLM option is not silently ignored
    (VPAdaptOptions, {"model": "lstm", "epochs": 5.0}, "--epochs"),
    (VPAdaptOptions, {"lstm_epochs": 5}, "--lstm-epochs"),  # an LSTM option without --model lstm
    (VPAdaptOptions, {"model": "lstm", "lstm_lr": 0}, "--lstm-lr"),
    (VPEvalOptions, {"split": "nope"}, "--split"),
    (VPEvalOptions, {"hw": 1.5}, "--hw"),
    (VPEvalOptions, {"shuffle": True}, "--shuffle"),
    (VPBenchOptions, {"controls": "scratch"}, "--controls"),
    (VPBenchOptions, {"train_seeds": "x"}, "--train-seeds"),
    (VPBenchOptions, {"train_seeds": ""}, "--train-seeds"),
    (VPBenchOptions, {"train_seeds": "2-1"}, "--train-seeds"),
    (VPRecipe, {"augment": "flip"}, "--augment"),
    (VPRecipe, {"augment": "none,mirror"}, "--augment"),
    (VPRecipe, {"lora_dropout": 0.95}, "--lora-dropout"),
    (VPRecipe, {"valid_stride": 0}, "--valid-stride"),
    (VPRecipe, {"dataset": "all"}, "--dataset"),
    (VPBenchOptions, {"seed": 2}, "--seed"),
])
def test_options_reject_bad_values(cls, values, needle):
    with pytest.raises(NetLLMError, match=needle):
        cls.build(**values)


def test_baselines_and_run_folders_become_policies(samples, tmp_path):
    assert set(TASK.baselines()) >= {"no-motion", "velocity", "lr"}
    short = VPEvalOptions(fw=7)
    assert load_policy(TASK, "no-motion", short).predict(samples.history[:3]).shape == (3, 7, 3)
    with pytest.raises(NetLLMError, match="not a baseline of vp"):
        load_policy(TASK, "static", short)
    with pytest.raises(NetLLMError, match="not a run folder"):
        load_policy(TASK, str(tmp_path / "nowhere"), short)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NetLLMError, match=f"{tmp_path / 'empty'}: holds neither"):
        load_policy(TASK, str(tmp_path / "empty"), short)
    train_lstm(samples, None, LSTMRecipe(hidden=8, epochs=1), tmp_path / "lstm", log=lambda *_: None)
    assert isinstance(load_policy(TASK, str(tmp_path / "lstm"), VPEvalOptions()), LSTMPredictor)
    with pytest.raises(NetLLMError, match="trained for hw=10, fw=20; the evaluation uses hw=10, fw=7"):
        load_policy(TASK, str(tmp_path / "lstm"), short)


def test_task_evaluate_checks_the_window_and_writes_the_plots(tmp_path, samples, monkeypatch):
    import netllm.tasks.vp.task as vp

    monkeypatch.setattr(vp, "load_samples", lambda dataset, split, spec, strict=False: samples)
    with pytest.raises(NetLLMError, match="--policy short: trained for hw=10, fw=7"):
        TASK.evaluate({"short": NoMotion(7)}, [0], VPEvalOptions(), tmp_path / "bad")
    results = TASK.evaluate({"no-motion": NoMotion(20)}, [0, 1], VPEvalOptions(), tmp_path / "ok")
    assert results["no-motion"].per_seed == {0: results["no-motion"].mean, 1: results["no-motion"].mean}
    for name in ("results.json", "rows.csv", "box.png", "horizon.png", "horizon.json"):
        assert (tmp_path / "ok" / name).is_file(), name


# ----------------------------------------------------------------------------- the CLI


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netllm.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def _command(*path: str):
    import typer

    from netllm.cli import build_app

    command = typer.main.get_command(build_app())
    for name in path:
        command = command.commands[name]
    return command


def test_cli_defaults_are_the_recipe():
    recipe = dataclasses.asdict(VPRecipe())
    for path in (("adapt", "vp"), ("bench", "vp")):
        params = {p.name: p.default for p in _command(*path).params}
        assert {k: params[k] for k in recipe} == recipe, path
    adapt_params = {p.name: p.default for p in _command("adapt", "vp").params}
    assert adapt_params["model"] == "netllm" and adapt_params["lstm_epochs"] == LSTMRecipe().epochs
    eval_params = {p.name: p.default for p in _command("eval", "vp").params}
    assert {k: eval_params[k] for k in dataclasses.asdict(VPEvalOptions())} == dataclasses.asdict(VPEvalOptions())


BAD_OPTIONS = {
    "eval": [["--hw", "many"], ["--hw", "0"], ["--fw", "0"], ["--step", "-1"], ["--split", "nope"],
             ["--dataset", "X"], ["--seeds", "3-1"], ["--policy", "static"], ["--policy", "./no/such/run"]],
    "adapt": [["--hw", "many"], ["--fw", "0"], ["--step", "0"], ["--dataset", "X"], ["--batch-size", "x"],
              ["--batch-size", "0"], ["--lr", "x"], ["--lr", "0"], ["--layers", "0"], ["--rank", "-1"],
              ["--epochs", "0"], ["--steps", "0"], ["--warmup-steps", "-1"], ["--weight-decay", "x"],
              ["--schedule", "step"], ["--eval-every", "-1"], ["--seed", "x"], ["--model", "cnn"],
              ["--model", "lstm", "--rank", "8"], ["--lstm-epochs", "3"], ["--model", "lstm", "--lstm-lr", "0"],
              ["--device", "cuda:7"]],
    "bench": [["--controls", "scratch"], ["--train-seeds", "x"], ["--train-seeds", ""], ["--seed", "2"],
              ["--fw", "0"], ["--epochs", "x"], ["--augment", "flip"]],
}


@pytest.mark.parametrize("command, args", [(c, a) for c, cases in BAD_OPTIONS.items() for a in cases],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_bad_option_is_one_line_before_any_work(tmp_path, command, args):
    out = tmp_path / "run"
    policy = ["--policy", "no-motion"] if command == "eval" and "--policy" not in args else []
    r = _cli(command, "vp", *policy, *args, "--out", str(out))
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = [line for line in r.stderr.strip().splitlines() if not line.startswith("warning:")]
    needle = args[-2] if args[-2].startswith("--") else args[0]
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_cli_without_data_is_one_line_before_any_work(tmp_path):
    for i, args in enumerate((["eval", "vp", "--policy", "no-motion"], ["adapt", "vp"],
                              ["adapt", "vp", "--model", "lstm"])):
        out = tmp_path / f"run{i}"
        r = _cli(*args, "--out", str(out), env={"NETLLM_DATA": str(tmp_path / "empty")})
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "netllm data fetch vp" in r.stderr or "NETLLM_DATA" in r.stderr, r.stderr
        assert not out.exists()  # the data is checked before the run folder is written


@pytest.mark.integration
def test_cli_eval_writes_results_and_plots(real_data, tmp_path):
    out = tmp_path / "eval"
    done = _cli("eval", "vp", "--policy", "no-motion", "--policy", "velocity", "--policy", "lr",
                "--dataset", "Jin2022", "--split", "test", "--out", str(out), env={"NETLLM_DATA": str(real_data)})
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["no-motion"]["metric"] == "mae_deg"
    assert results["no-motion"]["mean"] == pytest.approx(9.76, abs=0.05)
    for name in ("rows.csv", "box.png", "horizon.png", "horizon.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["command"] == "eval vp" and (config["hw"], config["fw"], config["split"]) == (10, 20, "test")


def test_mirror_augmentation_is_the_mirror_image_of_the_window(samples):
    """A mirrored window's inputs and targets are those of the head motion with yaw and
    roll negated; yaw-offset turns only the absolute yaw; the stream is per batch index."""
    from netllm.tasks.vp.dataset import relative, wrap
    from netllm.tasks.vp.task import batches

    part = samples.subset(slice(0, 64))
    plain, mirrored = batches(part, 64, 0)(0), batches(part, 64, 0, ("mirror",))(0)
    assert torch.equal(batches(part, 64, 0, ("mirror",))(0)["features"], mirrored["features"])
    flip = (mirrored["target"][:, :, 2] != plain["target"][:, :, 2]).any(1).numpy()
    assert 10 < flip.sum() < 54
    perm = np.random.default_rng(0).permutation(64)
    h, f = part.history[perm].copy(), part.future[perm].copy()
    for a in (h, f):
        a[flip, :, 0] *= -1
        a[flip, :, 2] = wrap(-a[flip, :, 2])
    _, rel_f = relative(h, f)
    assert torch.allclose(mirrored["features"], torch.as_tensor(step_features(h)), atol=1e-6)
    assert torch.allclose(mirrored["target"], torch.as_tensor(rel_f / 30.0, dtype=torch.float32), atol=1e-5)
    turned = batches(part, 64, 0, ("yaw-offset",))(0)["features"]
    changed = (turned != plain["features"]).any(dim=(0, 1))
    assert changed.tolist() == [[False, False, True], [False, False, False], [False, False, False]]


def test_bench_over_two_training_seeds_reports_spread_and_paired_intervals(tiny_llama, real_data, tmp_path,
                                                                            monkeypatch):
    """`bench vp --train-seeds 0-1`: each variant and the LSTM trained per seed, the table
    over training seeds, paired differences with intervals; a rerun reuses every stage."""
    monkeypatch.setenv("NETLLM_DATA", str(real_data))
    options = VPBenchOptions.build(llm=tiny_llama, layers=2, rank=4, steps=4, batch_size=8, eval_every=2,
                                   warmup_steps=0, step=300, valid_stride=8, train_seeds="0-1", controls="random")
    summary = TASK.bench(options, tmp_path / "bench", device="cpu")
    for dataset in ("Jin2022", "Wu2017"):
        table = summary[dataset]
        label = "netllm-" + os.path.basename(tiny_llama)
        assert table[label]["seeds"] == [0, 1] and table[label]["paired_over"] == "training seeds"
        assert table["lstm"]["seeds"] == [0, 1] and table["no-motion"]["seeds"] == [0]
        comps = table["comparisons"]
        assert {f"{label} - lstm", f"{label} - no-motion", f"{label} - {label}-random-init"} <= set(comps)
        for c in comps.values():
            assert c["n"] == 2 and len(c["ci"]) == 2 and c["ci"][0] <= c["mean"] <= c["ci"][1]
        assert table["best_baseline"] in ("no-motion", "velocity", "lr", "lstm")
        results = json.loads((tmp_path / "bench" / dataset / "results.json").read_text())
        assert set(results[label]["per_train_seed"]) == {"0", "1"}
    for run in ("lstm-seed0", "lstm-seed1", f"{label}-seed0", f"{label}-random-init-seed1"):
        assert (tmp_path / "bench" / run).is_dir(), run
    again = TASK.bench(options, tmp_path / "bench", device="cpu")
    assert not [k for k in again["wall_s"] if k.startswith(("adapt", "train"))]  # every stage reused
    assert again["Jin2022"][label]["mean"] == summary["Jin2022"][label]["mean"]
    # the same folder under another recipe: one line naming the folder and the field, nothing trained
    other = VPBenchOptions.build(llm=tiny_llama, layers=2, rank=4, steps=4, batch_size=8, eval_every=2,
                                 warmup_steps=0, step=300, valid_stride=8, train_seeds="0-1", controls="random",
                                 head_skip=True)
    with pytest.raises(NetLLMError, match=rf"{label}-seed0: holds a run of another recipe \(head_skip: False there"):
        TASK.bench(other, tmp_path / "bench", device="cpu")
    from netllm.recipe import check_same_recipe
    from netllm.tasks.vp.baselines import LSTM_CONFIG

    check_same_recipe(tmp_path / "bench" / "lstm-seed1", LSTMRecipe(seed=1, augment="mirror"), LSTM_CONFIG)
    with pytest.raises(NetLLMError, match=r"lstm-seed1: holds a run of another recipe \(augment: 'mirror' there"):
        check_same_recipe(tmp_path / "bench" / "lstm-seed1", LSTMRecipe(seed=1, augment="none"), LSTM_CONFIG)
