"""CJS — Spark cluster job scheduling on TPC-H job DAGs (Decima's simulator semantics).

    datasets.py    the data sets (TPC-H jobs, Decima's weights) for ``netllm data``
    jobs.py        TPC-H job templates: DAG + measured task durations, checked
    sim.py         the event-driven Spark cluster simulator (Gymnasium-style)
    decima.py      Decima's GNN and scoring network, its pretrained weights
    baselines.py   FIFO, Fair and Decima (pretrained weights) behind one interface
    features.py    the NetLLM scheduler's state: candidates and state vectors from the
                   frozen Decima GNN
    pool.py        experience pools: recorded episodes, best-of draws and segments,
                   pool checks and loading
    policy.py      the NetLLM scheduler: model, loss, KV-cached decisions, adaptation
    task.py        the Task: evaluation, collection, adaptation and benchmark commands

Imports go one way: task -> policy -> pool -> features -> decima -> sim -> jobs
(baselines -> decima, sim; pool and policy also use baselines).
"""

import gymnasium

from netllm.tasks.cjs.task import TASK

# Gymnasium id, once per process
if "netllm/CJS-v0" not in gymnasium.registry:
    gymnasium.register(id="netllm/CJS-v0", entry_point="netllm.tasks.cjs.sim:CJSGymEnv")

__all__ = ["TASK"]

