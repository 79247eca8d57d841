"""Communication: the only package that imports mpi4py.

    group.py   Group: one MPI communicator, every collective and point-to-point call
    wire.py    arrays to MPI buffers: host as is, device staged or CUDA-aware, fp16 upcast
    ring.py    ring all-reduce / reduce-scatter / all-gather written from Sendrecv steps
    grid.py    the (dp, pp, tp, cp) process grid and its sub-groups
    ledger.py  what every call moved: op, group, dtype, elements, ring bytes per rank
"""
