"""Data-parallel training on Hugging Face Accelerate (CPU, gloo): ``accelerate launch``
with 2 processes follows the same run as 1 process; resume works under 2 processes;
the real ``netllm adapt`` runs under ``accelerate launch -m netllm``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from netllm.backbone import native_bf16



class _Launch(list):
    """``accelerate launch`` with 2 CPU processes (gloo), each launch on a port of its own."""

    def __add__(self, rest: list[str]) -> list[str]:  # type: ignore[override]
        from netllm.serve.app import free_port

        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()), *rest]


ACCELERATE = _Launch()

# a model with LoRA-like dropout and a loss that calls a method besides forward, trained by
# the project's loop; argv: out_dir processes grad_accum steps stop_after(0: none) resume(0/1)
SCRIPT = '''
import sys, torch
from torch import nn
from netllm.train import TrainConfig, train

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.drop = nn.Linear(6, 16), nn.Linear(16, 1), nn.Dropout(0.2)
        self.unused = nn.Linear(3, 3)  # trainable but never in the loss
    def score(self, x):
        return self.b(self.drop(torch.tanh(self.a(x)))).squeeze(-1)

def get_batch(i):
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(4, 6, generator=g)
    return x, x.sum(-1).sin()

def loss_fn(model, batch):
    x, y = batch
    return ((model.score(x) - y) ** 2).mean(), {"samples": float(len(x))}

out, grad_accum, steps, stop, resume = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
config = TrainConfig(steps=steps, lr=1e-2, warmup_steps=0, grad_accum=grad_accum, checkpoint_every=3, log_every=1,
                     seed=5, progress=False, tensorboard=False)
train(Net(), get_batch, loss_fn, config, out, resume=resume, stop_after=stop or None)
'''


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def _losses(folder: Path) -> list[float]:
    with open(folder / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "checkpoint" / "model.safetensors")


def test_two_processes_follow_one_process_and_resume_exactly(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    py = [sys.executable, str(script)]
    _run(py + ["one", "2", "9", "0", "0"], tmp_path)  # 1 process, 2 micro-batches per step
    _run(ACCELERATE + [str(script), "two", "1", "9", "0", "0"], tmp_path)  # 2 processes, 1 each
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 9
    # the same batches each step; only the dropout masks of the second micro-batch differ
    assert two[0] == pytest.approx(one[0], rel=0.25)
    assert sum(two[-3:]) == pytest.approx(sum(one[-3:]), rel=0.25)
    state = json.loads((tmp_path / "two" / "checkpoint" / "trainer_state.json").read_text())
    assert state["processes"] == 2 and state["step"] == 9
    with open(tmp_path / "two" / "metrics.csv") as f:
        assert float(next(csv.DictReader(f))["samples_per_s"]) > 0  # counted over both processes

    # interrupted after step 4 (checkpoint at 3), resumed under 2 processes: the same weights
    _run(ACCELERATE + [str(script), "cut", "1", "9", "4", "0"], tmp_path)
    _run(ACCELERATE + [str(script), "cut", "1", "9", "0", "1"], tmp_path)
    full, cut = _weights(tmp_path / "two"), _weights(tmp_path / "cut")
    for name in full:
        torch.testing.assert_close(cut[name], full[name], rtol=0, atol=1e-6)
    assert _losses(tmp_path / "cut") == pytest.approx(two, abs=1e-6)

    # resuming with another number of processes is refused, naming why
    done = subprocess.run(py + ["cut", "1", "12", "0", "1"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert done.returncode != 0 and "resume with the same number of processes" in done.stderr


def test_without_dropout_two_processes_equal_one_with_twice_the_accumulation(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT.replace("nn.Dropout(0.2)", "nn.Dropout(0.0)"))
    _run([sys.executable, str(script), "one", "2", "6", "0", "0"], tmp_path)
    _run(ACCELERATE + [str(script), "two", "1", "6", "0", "0"], tmp_path)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_accelerate_launch_runs_netllm_adapt(tiny_llama, real_data, tmp_path, monkeypatch):
    """The CLI itself under `accelerate launch -m netllm`: one run folder, one adapter,
    which `netllm eval` loads; --dtype bf16 trains on a CPU with native bf16 and is refused
    before anything is written on one without."""
    from netllm.tasks.abr.task import collect_pool, evaluate, policy_by_name
    from netllm.tasks.abr.traces import synthetic_traces, synthetic_video

    monkeypatch.setenv("NETLLM_DATA", str(real_data))  # validation on fcc-holdout
    traces, video = synthetic_traces(6, seed=3), synthetic_video(seed=0)
    pool = collect_pool(["bba"], traces, video, seeds=[1])
    pool_path = pool.save(tmp_path / "pool")
    args = ["adapt", "abr", "--pool", str(pool_path), "--llm", tiny_llama, "--layers", "2", "--rank", "4",
            "--context", "4", "--batch-size", "4", "--steps", "4", "--warmup-steps", "0", "--eval-every", "0",
            "--device", "cpu"]
    _run(ACCELERATE + ["-m", "netllm", *args, "--out", str(tmp_path / "ddp")], tmp_path)
    adapter = tmp_path / "ddp"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "netllm_modules.safetensors").is_file()
    state = json.loads((adapter / "train" / "checkpoint" / "trainer_state.json").read_text())
    assert state["processes"] == 2 and state["step"] == 4
    rows = _losses(adapter / "train")
    assert rows and all(r == r for r in rows)  # logged once (main process), finite
    policy = policy_by_name(str(adapter), device="cpu")  # what `netllm eval --policy` loads
    assert evaluate(policy, traces[:2], video, [1]).mean == evaluate(policy, traces[:2], video, [1]).mean
    bf16 = subprocess.run([sys.executable, "-m", "netllm", *args, "--dtype", "bf16", "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=300)
    if native_bf16(torch.device("cpu")):  # a CPU with AMX / AVX512-BF16 trains under bf16 autocast
        assert bf16.returncode == 0, bf16.stderr
        assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["extra"]["recipe"]["dtype"] == "bf16"
        assert all(r == r for r in _losses(tmp_path / "b" / "train"))
    else:  # elsewhere refused before anything is written
        assert bf16.returncode == 2 and "--dtype bf16" in bf16.stderr and "Traceback" not in bf16.stderr
        assert not (tmp_path / "b").exists()
    # the shipped FSDP config on a CPU: one line per process, no run folder
    fsdp = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes",
                          "2", "--main_process_port", str(_port()), "-m", "netllm", *args, "--out",
                          str(tmp_path / "f")], capture_output=True, text=True, timeout=600)
    assert fsdp.returncode != 0 and "FSDP shards a model over CUDA GPUs" in fsdp.stderr
    assert not (tmp_path / "f").exists()


def _port() -> int:
    from netllm.serve.app import free_port

    return free_port()


# PPO fine-tuning of a tiny ABR adapter; argv: offline_adapter out batch_size iterations resume(0/1)
FINETUNE = '''
import sys
from netllm.finetune import FinetuneOptions, run_finetune
from netllm.model import NetLLM
from netllm.tasks.abr.online import ABROnline
from netllm.tasks.abr.traces import synthetic_traces, synthetic_video

offline, out, batch, iterations, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
video = synthetic_video(seed=0, num_chunks=12)
hooks = ABROnline(30.0, synthetic_traces(6, seed=3), [video], synthetic_traces(4, seed=9), [video], envs=4,
                  generated=2, high_mbps=30.0)
options = FinetuneOptions(adapter=offline, iterations=iterations, envs=4, batch_size=batch, lr=1e-3, epochs=2)
run_finetune(NetLLM.from_adapter(offline, task="abr"), NetLLM.from_adapter(offline, task="abr", merge=True), hooks,
             options, out, seeds_of=lambda it: [it], extra={"target_return": 30.0}, resume=resume, progress=False)
'''


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_finetune_on_two_processes_follows_one_process_with_twice_the_batch(tiny_llama, tmp_path):
    """PPO under `accelerate launch` (2 processes, batch b): the rollouts and validation
    episodes are shared among the processes and every process gets all of them; the
    minibatches of 2b windows are cut in two with DDP averaging the gradients. The same
    episodes and statistics as one process with batch 2b, the same weights up to float
    rounding; an interrupted 2-process run resumes to the same weights; resuming it in
    one process is refused."""
    from netllm.model import NetLLM
    from netllm.tasks.abr.task import model_config

    torch.manual_seed(0)
    offline = tmp_path / "offline"
    NetLLM(model_config(llm=tiny_llama, layers=2, rank=4, context=4)).save_adapter(
        offline, extra={"target_return": 30.0})
    script = tmp_path / "ppo.py"
    script.write_text(FINETUNE)
    _run([sys.executable, str(script), str(offline), "one", "8", "2", "0"], tmp_path)
    _run(ACCELERATE + [str(script), str(offline), "two", "4", "2", "0"], tmp_path)
    drop = ("wall_s", "rollout_s", "iteration_s")
    one, two = ([{k: v for k, v in r.items() if k not in drop} for r in _csv_rows(tmp_path / d / "metrics.csv")]
                for d in ("one", "two"))
    assert len(one) == len(two) == 3  # the offline adapter's validation, iterations 1 and 2
    for want, got in zip(one, two):
        assert got.keys() == want.keys()
        assert got["decisions"] == want["decisions"] and got["return"] == want["return"]
        for key in want:
            if want[key] in ("", "True", "False"):
                assert got[key] == want[key], key
            else:
                assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-4, abs=1e-6), key
    w1, w2 = _weights(tmp_path / "one" / "train"), _weights(tmp_path / "two" / "train")
    assert w1.keys() == w2.keys() and any("value" in k for k in w1)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-4)
    assert float(one[1]["kl"]) > 0 and float(one[2]["clip_frac"]) >= 0  # the policy moved off the offline one
    state = json.loads((tmp_path / "two" / "train" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["config"]["processes"] == 2
    assert (tmp_path / "two" / "adapter_config.json").is_file()

    # 1 iteration, then resumed to 2 under 2 processes: the uninterrupted run's weights
    _run(ACCELERATE + [str(script), str(offline), "cut", "4", "1", "0"], tmp_path)
    _run(ACCELERATE + [str(script), str(offline), "cut", "4", "2", "1"], tmp_path)
    cut = _weights(tmp_path / "cut" / "train")
    for name in w2:
        torch.testing.assert_close(cut[name], w2[name], rtol=0, atol=1e-6)
    alone = subprocess.run([sys.executable, str(script), str(offline), "cut", "4", "3", "1"], capture_output=True,
                           text=True, cwd=tmp_path, timeout=300)
    assert alone.returncode != 0 and "differs in processes" in alone.stderr
