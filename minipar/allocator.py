"""The host allocator: keep the memory a training step frees for the next step.

Every step allocates its activations, gradients and temporaries and frees them again.
With glibc's defaults the freed memory is handed back to the operating system: blocks
above the mmap threshold (128 KiB, raised dynamically up to 32 MiB) are unmapped at once,
and free memory at the top of the heap beyond the trim threshold is trimmed. The next
step then faults every page in again, zero-filled by the kernel: about 20 k minor page
faults per step at d_model 256 against 0-3 k for PyTorch, whose allocator keeps memory.

`keep_freed_memory()` sets the two thresholds once for the process (mallopt):

    M_MMAP_THRESHOLD = 32 MiB    arrays up to 32 MiB come from the heap, not a fresh mmap
    M_TRIM_THRESHOLD = 1 GiB     the heap keeps up to 1 GiB of free memory for reuse

Peak RSS does not grow (what is kept was in use at the step's peak). It is a process
setting, so the programs that own the process call it (minipar.train, the benchmarks),
never a library constructor. Elsewhere than glibc it does nothing and returns False.
"""
import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc's mallopt parameter numbers (malloc.h)
TRIM_BYTES, MMAP_BYTES = 1 << 30, 32 << 20


def keep_freed_memory():
    """mallopt(M_MMAP_THRESHOLD, 32 MiB) and mallopt(M_TRIM_THRESHOLD, 1 GiB); True if both took."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, TypeError, AttributeError):       # no C library found, or not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
