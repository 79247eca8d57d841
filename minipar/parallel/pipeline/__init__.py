"""Pipeline parallelism: layers cut into stages, micro-batches passed along the pp ring.

    stages.py     which layers a stage holds, and the tied embedding across first and last
    schedules.py  schedules as data: GPipe, 1F1B, interleaved, zero-bubble, as action lists
    executor.py   runs one rank's action list: F, B, W, send and receive
    trace.py      what ran and when: the measured bubble and an ASCII Gantt chart
"""
