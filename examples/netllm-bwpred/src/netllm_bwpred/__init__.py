"""bwpred — throughput (bandwidth) prediction on the ABR traces, a NetLLM plug-in task.

From the last 10 s of throughput (1 s samples, Mbps) predict the next 5 s.

    data.py       traces -> 1 s series -> (history, future) windows; which trace sets exist
    baselines.py  last-value, harmonic-mean (RobustMPC's estimator), a small trained LSTM
    task.py       NetLLM for bwpred: a token per history second, all 5 future seconds at once

Registered under the entry-point group ``netllm.tasks`` (see this package's pyproject.toml),
so ``netllm eval bwpred`` and ``netllm adapt bwpred`` exist once it is installed.
"""

from netllm_bwpred.task import TASK

__all__ = ["TASK"]
