"""The CLI as a user meets it: real subprocesses, one-line errors, no tracebacks."""

from __future__ import annotations

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
    for bad in ("a", "3-1", "", "1-x"):
        with pytest.raises(NetLLMError, match="--seeds"):
            parse_seeds(bad)


@pytest.mark.parametrize("args, needle", [
    (["eval", "nosuchtask", "--policy", "x"], "unknown task 'nosuchtask'"),
    (["doctor", "--llm", "/no/such/model.gguf"], "GGUF file not found: /no/such/model.gguf"),
    (["doctor", "--device", "cuda:7"], "--device"),
    (["data", "fetch", "nonsense"], "nonsense"),
    (["eval", "nosuchtask", "--policy", "x", "--seeds", "3-1"], "--seeds"),
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
