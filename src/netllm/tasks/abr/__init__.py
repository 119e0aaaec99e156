"""ABR — adaptive bitrate streaming (Pensieve/Genet simulator, FCC traces).

    traces.py      bandwidth traces and video chunk sizes: loaders and generators
    env.py         the chunk-level simulator, one trace or many at once
    baselines.py   BBA, RobustMPC, GENET/UDR actors, the offline-optimal oracle
    checkpoint.py  upstream TensorFlow checkpoints -> actor npz (no TensorFlow)
    task.py        NetLLM for ABR: state tokens, evaluation, pools, adaptation
"""

import gymnasium

from netllm.tasks.abr.task import TASK

# Gymnasium ids, once per process (the environment module loads on the first make)
if "netllm/ABR-v0" not in gymnasium.registry:
    gymnasium.register(id="netllm/ABR-v0", entry_point="netllm.tasks.abr.env:ABREnv",
                       vector_entry_point="netllm.tasks.abr.env:make_batch_env")

__all__ = ["TASK"]

