"""ABR — adaptive bitrate streaming (Pensieve/Genet simulator, FCC traces).

    traces.py      bandwidth traces and video chunk sizes: loaders and generators
    env.py         the chunk-level simulator, one trace or many at once
    baselines.py   BBA, RobustMPC, GENET/UDR actors, the offline-optimal oracle
    checkpoint.py  upstream TensorFlow checkpoints -> actor npz (no TensorFlow)
    task.py        NetLLM for ABR: state tokens, evaluation, pools, adaptation
"""

from pathlib import Path

from netllm import data
from netllm.tasks.abr.task import ABRTask


def _convert_checkpoints(root: Path) -> None:
    from netllm.tasks.abr.checkpoint import convert_all

    convert_all(root)


data.POST_FETCH.setdefault("abr", _convert_checkpoints)

TASK = ABRTask()
