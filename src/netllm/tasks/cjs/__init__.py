"""CJS — Spark cluster job scheduling on TPC-H job DAGs (Decima's simulator semantics).

    jobs.py        TPC-H job templates: DAG + measured task durations, checked
    sim.py         the event-driven Spark cluster simulator (Gymnasium-style)
    baselines.py   FIFO, Fair and Decima (pretrained weights) behind one interface
    task.py        evaluation CLI and benchmark; the NetLLM scheduler's declaration
"""

from netllm.tasks.cjs.task import CJSTask

TASK = CJSTask()
