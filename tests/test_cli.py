"""The CLI as a user meets it: real subprocesses, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from netllm.utils import NetLLMError, parse_seeds


def netllm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "netllm.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_help_lists_every_command():
    r = netllm("--help")
    assert r.returncode == 0
    for cmd in ("doctor", "data", "collect", "adapt", "eval", "bench", "demo"):
        assert cmd in r.stdout
    for cmd in ("doctor", "data", "collect", "adapt", "eval", "bench", "demo", "data fetch", "data status"):
        sub = netllm(*cmd.split(), "--help")
        assert sub.returncode == 0, (cmd, sub.stderr)
        assert "Usage" in sub.stdout


def test_seeds_lists_and_ranges():
    assert parse_seeds("1,2,3") == [1, 2, 3]
    assert parse_seeds("1-10") == list(range(1, 11))
    assert parse_seeds("1-3,7") == [1, 2, 3, 7]
    for bad in ("a", "3-1", "", "1-x", "1,1", "1-3,2"):
        with pytest.raises(NetLLMError, match="--seeds"):
            parse_seeds(bad)
    with pytest.raises(NetLLMError, match="--train-seeds: seed 0 given twice"):
        parse_seeds("0,0", "--train-seeds")


@pytest.mark.parametrize("args, needle", [
    (["eval", "nosuchtask", "--policy", "x"], "unknown task 'nosuchtask'"),
    (["doctor", "--llm", "/no/such/model.gguf"], "GGUF file not found: /no/such/model.gguf"),
    (["doctor", "--device", "cuda:7"], "--device"),
    (["data", "fetch", "nonsense"], "nonsense"),
    (["eval", "abr", "--policy", "bba", "--seeds", "3-1"], "--seeds"),
    (["eval", "abr", "--policy", "bba", "--dtype", "fp16"], "--dtype"),
])
def test_user_errors_are_one_line_without_traceback(args, needle):
    r = netllm(*args)
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert needle in err
    assert len(err.splitlines()) == 1, err


def test_missing_data_root_is_named(tmp_path):
    r = netllm("data", "status", env={"NETLLM_DATA": str(tmp_path / "nowhere")})
    assert r.returncode != 0 and "NETLLM_DATA" in r.stderr and "Traceback" not in r.stderr


def test_data_status_on_real_data(real_data):
    r = netllm("data", "status", env={"NETLLM_DATA": str(real_data)})
    assert r.returncode == 0, r.stderr
    assert "abr" in r.stdout and "cjs" in r.stdout and "vp" in r.stdout


@pytest.mark.integration
def test_doctor_proves_pretrained_weights(tiny_llama, real_data):
    r = netllm("doctor", env={"NETLLM_DATA": str(real_data)})
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "layers: 30" in r.stdout and "torch" in r.stdout
    assert "ok" in r.stdout  # data sets found


def _task_commands():
    """(command group, task, options class, the built click command) of every installed task."""
    import typer

    from netllm.cli import build_app
    from netllm.registry import tasks

    root = typer.main.get_command(build_app())
    for task in tasks().values():
        for group, cls in (("adapt", task.AdaptOptions), ("eval", task.EvalOptions),
                           ("collect", task.CollectOptions), ("bench", task.BenchOptions),
                           ("finetune", task.FinetuneOptions)):
            if cls is not None:
                yield group, task, cls, root.commands[group].commands[task.name]


def test_cli_options_are_the_typed_options_with_their_defaults():
    """One place for each default: every field of a task's options dataclass is a CLI
    option with the dataclass default (no drift between `adapt`, `bench` and the recipe)."""
    import dataclasses

    from netllm.options import option_name

    seen = 0
    for group, task, cls, command in _task_commands():
        params = {p.name: p for p in command.params}
        for f in dataclasses.fields(cls):
            assert f.name in params, (group, task.name, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            got = params[f.name].default
            assert (got or []) == default if isinstance(default, list) else got == default, \
                (group, task.name, f.name, got, default)
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            assert option_name(f.name) in params[f.name].opts or f.metadata.get("flag")
            seen += 1
    assert seen > 30


def test_recipe_defaults_are_shared_by_adapt_and_bench():
    import dataclasses

    from netllm.registry import tasks

    for task in tasks().values():
        recipe = task.Recipe()
        for cls in (task.AdaptOptions, task.BenchOptions):
            if cls is None or not issubclass(cls, task.Recipe):
                continue
            built = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                     for f in dataclasses.fields(cls)}
            for f in dataclasses.fields(task.Recipe):
                assert built[f.name] == getattr(recipe, f.name), (task.name, cls.__name__, f.name)


def test_adapt_help_lists_every_option_with_its_default():
    r = netllm("adapt", "abr", "--help", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    for name in ("--layers", "--rank", "--context", "--steps", "--lr", "--batch-size", "--pool", "--random-init"):
        assert name in r.stdout
    assert "[default: 4]" in r.stdout and "[default: 0.0003]" in r.stdout


def test_written_files_have_an_ordinary_mode(tmp_path):
    from netllm.utils import _UMASK, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~_UMASK


def test_written_json_is_strict(tmp_path):
    from netllm.utils import atomic_write_json

    atomic_write_json(tmp_path / "ok.json", {"a": 1.5})
    with pytest.raises((NetLLMError, ValueError)):
        atomic_write_json(tmp_path / "bad.json", {"a": float("inf")})
    assert not (tmp_path / "bad.json").exists()


# a bad value of every free-text option (the typed ones get one from their type)
BAD_TEXT = {
    "llm": "/no/such/model.gguf", "traces": "no-such-traces", "valid_traces": "no-such-traces",
    "video": "no-such-video", "valid_video": "no-such-video", "videos": "video1,no-such-video",
    "pool_videos": "no-such-video", "seeds": "x", "pool_seeds": "3-1", "behaviour": "no-such-policy",
    "baselines": "no-such-policy", "policies": "no-such-policy", "controls": "no-such-control",
    "settings": "default,no-such-setting", "decode": "greedy", "unseen_by": "no-such-traces",
    "train_seeds": "1-x", "augment": "flip", "adapter": "/no/such/adapter", "valid_seeds": "1-x",
}
# what an eval / collect needs besides the option under test
POLICY = {"abr": "bba", "cjs": "fifo", "vp": "no-motion"}


def _bad_values(f, kind) -> list[str]:
    if kind is bool:
        return []  # a flag has no bad value
    if kind is list:
        return ["/no/such/pool.npz"]
    if kind in (int, float):
        lo = f.metadata.get("min")
        return ["x"] + ([f"{lo - 1:g}"] if lo is not None else [])
    if f.metadata.get("choices"):
        return ["no-such-choice"]
    assert f.name in BAD_TEXT, f"add a bad value for the text option {f.name!r} to BAD_TEXT"
    return [BAD_TEXT[f.name]]


def _cases():
    from netllm.options import fields_of

    for group, task, cls, _ in _task_commands():
        if task.name not in POLICY:
            continue  # a plug-in installed beside: its own tests cover it
        for f, kind, _optional in fields_of(cls):
            for value in _bad_values(f, kind):
                yield pytest.param(group, task.name, f.name, value, id=f"{group}-{task.name}-{f.name}={value}")


@pytest.mark.parametrize("group, task_name, field, value", list(_cases()))
def test_every_bad_option_is_one_line_exit_2_before_any_work(group, task_name, field, value, tmp_path,
                                                             capsys, monkeypatch, real_data):
    """Each option of each task command, given a bad value: one line naming it, exit code 2,
    no run folder, and no task work started (the task's commands are replaced by a trap)."""
    from netllm.cli import main
    from netllm.options import option_name
    from netllm.registry import get_task

    monkeypatch.setenv("NETLLM_DATA", str(real_data))
    task = get_task(task_name)
    for method in ("evaluate", "adapt", "collect", "bench", "finetune"):
        monkeypatch.setattr(task, method, lambda *a, **k: pytest.fail(f"work started despite {field}={value!r}"))
    out = tmp_path / "run"
    args = [group, task_name, option_name(field), value, "--out", str(out)]
    if group in ("eval", "collect"):
        args += ["--policy", POLICY[task_name]]
    if group == "adapt" and field != "pool":
        pool = tmp_path / "pool.npz"
        pool.write_bytes(b"")
        args += ["--pool", str(pool)] if task_name != "vp" else []
    if group == "finetune" and field != "adapter":  # a CJS adapter's config is all its checks read
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps(
            {"task": task_name, "llm": "smollm2", "encoders": [], "heads": {}, "lora": {}, "rl": {"context_steps": 4}}))
        args += ["--adapter", str(adapter)]
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("error:") and option_name(field) in err[0], err
    assert not out.exists()
