"""minipar.allocator: a step's freed memory is kept for the next step, not faulted in again."""
import subprocess
import sys

import pytest

pytestmark = pytest.mark.core

# a training step in miniature: allocate ~100 MB in arrays of 1-16 MB, touch them, free them all
STEPS = """
import resource, sys
import numpy as np
from minipar.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def step():
    arrays = [np.ones(n << 18, np.float32) for n in (1, 2, 4, 8, 16, 4, 2, 1, 8, 16, 16, 8, 8, 4)]
    del arrays
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def faults_per_step(mode):
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    _, default = faults_per_step("default")
    kept, keep = faults_per_step("keep")
    assert kept == "True"
    # 100 MB is ~25 k pages: by default thousands of them come back from the OS every step
    assert default > 2000 and keep < default / 20, (default, keep)
