"""Communication: the only package that imports mpi4py.

    group.py         Group: one MPI communicator and its collectives on arrays
    communicator.py  what Group extends: members, sub-groups, point-to-point, small metadata
    request.py       Request: a pending non-blocking call until wait()
    wire.py          arrays to MPI buffers: host as is, device staged or CUDA-aware, fp16 upcast
    ring.py          ring all-reduce / reduce-scatter / all-gather written from Sendrecv steps
    grid.py          the (dp, pp, tp, cp) process grid and its sub-groups
    ledger.py        what every call moved: op, group, dtype, elements, ring bytes per rank
    exit.py          exit_agreed: end the job quietly with the code every rank agreed on
"""
