"""VP — viewport prediction for 360° video (Jin2022 and Wu2017 head-motion traces).

    dataset.py     viewport csv loader, the spec's video/user splits, sample windows, angles
    baselines.py   no-motion, velocity, linear regression, a trained LSTM encoder-decoder
    task.py        NetLLM for VP: a token per history step, all future steps in one pass
"""

from netllm.tasks.vp.task import TASK

__all__ = ["TASK"]

