"""exit_agreed: end the whole MPI job quietly with an exit code every rank agreed on.

minipar.train ends this way after a usage error or a divergence that every rank saw
alike: nothing is printed but the application's own line (no MPI_Abort banner, no
"BAD TERMINATION"), and mpiexec returns the code.
"""
import fcntl
import os
import struct
import sys
import termios
import time

from mpi4py import MPI


def exit_agreed(code):
    """End the job with `code` when every rank reached the same verdict (a usage error every
    rank detected alike in validation, a divergence every rank saw in the same loss), with
    nothing printed but the application's own line.

    Not MPI_Abort: MPICH prints "Abort(code) on node 0 ... MPI_Abort(...)" for it. Not each
    rank exiting with `code` either: MPICH's process manager (hydra) kills the ranks still
    running when the first one exits, and prints a "BAD TERMINATION" banner for them. So
    under hydra, once every rank has flushed, rank 0 makes the request MPI_Abort makes
    underneath, an abort of the job with `code` on its process-manager connection (the PMI
    wire protocol, fd $PMI_FD), and hydra ends every rank quietly; mpiexec returns `code`.
    Elsewhere (one process, another launcher) every rank finalizes and exits with `code`.
    A failure that only some ranks see must not come here (the others would wait forever):
    it raises, and `python -m mpi4py` turns the exception into MPI_Abort.

    Flushed is not yet forwarded: hydra's proxy reads each rank's stdout/stderr pipe and
    passes it on to mpiexec, and an abort it handles first would drop what it had not read
    (on a loaded machine, the one error line). So each rank waits, a bounded while, until
    its pipes are empty (`unread`), i.e. the proxy has taken every byte, before the barrier."""
    sys.stdout.flush()
    sys.stderr.flush()
    deadline = time.monotonic() + 10
    while (unread(1) or unread(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    world = MPI.COMM_WORLD
    world.Barrier()                 # everyone has printed, and the launcher has read it all
    if world.Get_size() > 1 and os.environ.get("PMI_FD", "").isdigit():
        if world.Get_rank() == 0:
            os.write(int(os.environ["PMI_FD"]), f"cmd=abort exitcode={code}\n".encode())
        time.sleep(30)              # hydra ends every rank; if it did not, exit as below
    MPI.Finalize()
    os._exit(code)                  # past mpi4py's exit hook, which would call MPI_Abort(code)


def unread(fd):
    """Bytes written to `fd` that its reader has not read yet (FIONREAD); 0 if fd is not a
    pipe or socket (a terminal, a file: nothing is waiting to be forwarded)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
    except OSError:
        return 0
