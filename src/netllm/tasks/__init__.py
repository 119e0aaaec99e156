"""The built-in networking tasks, one folder each with the same file roles:

    <sim or dataset>.py   the environment or the data set
    baselines.py          the policies NetLLM is compared with
    policy.py / task.py   the NetLLM policy and the Task (options, commands)

Tasks are found through the entry-point group ``netllm.tasks`` (see ``netllm.registry``);
these register there like any third-party task.
"""
