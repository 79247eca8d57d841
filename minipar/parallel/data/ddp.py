"""Data parallelism: every rank holds the whole model and a slice of the batch.

After backward, rank r holds g_r = dL_r/dw for its slice; the update needs the
global gradient g = (1/N) sum_r g_r. PyTorch DDP's recipe (Li et al. 2020):

  * gradients live in a few flat, contiguous buckets (each p.grad is a view),
  * buckets are filled in reverse parameter order, the order backward produces them,
  * the moment a bucket's last gradient is final, a non-blocking all-reduce of
    that bucket starts, so communication overlaps the rest of backward,
  * all requests are waited on before the optimizer step.

With gradient accumulation over micro-batches, nothing is communicated until
the last micro-batch (`sync=False` for the others).

        params (reverse order)  w_L ... w_k | w_k-1 ... w_j | ... | ... w_0
        buckets                 [ bucket 0  ][  bucket 1    ] ... [ bucket n ]
        all-reduce starts       ^ early (overlaps backward of earlier layers)      ^ last
"""
import numpy as np

from minipar.backend import array_module
from minipar.contracts import GradientSync


class Bucket:
    """A flat gradient buffer for a run of parameters with the same dtype."""

    def __init__(self, params, xp):
        self.params = params
        self.buffer = xp.zeros(sum(p.data.size for p in params), dtype=params[0].data.dtype)
        self.views, offset = [], 0
        for p in params:
            self.views.append(self.buffer[offset: offset + p.data.size].reshape(p.data.shape))
            offset += p.data.size
        self.ready, self.request = 0, None


class DataParallel(GradientSync):
    """Bucketed, overlapped gradient averaging over the data-parallel group (a GradientSync)."""

    def __init__(self, params, group, bucket_bytes=2 ** 20, overlap=True):
        self.group, self.overlap, self.sync = group, overlap, True
        params = [p for p in params if p.requires_grad][::-1]     # reverse: backward order
        self.buckets, run, size = [], [], 0
        for p in params:
            if run and (size + p.data.nbytes > bucket_bytes or p.data.dtype != run[0].data.dtype):
                self.buckets.append(Bucket(run, array_module(run[0].data)))
                run, size = [], 0
            run.append(p)
            size += p.data.nbytes
        if run:
            self.buckets.append(Bucket(run, array_module(run[0].data)))
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        for b in self.buckets:
            for p in b.params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self.zero_grad()

    def zero_grad(self):
        """Zero the buckets and point every p.grad at its slot (grads accumulate in place)."""
        for b in self.buckets:
            b.buffer[...] = 0
            b.ready, b.request = 0, None
            for p, view in zip(b.params, b.views):
                p.grad = view

    def set_last_micro_batch(self, last):
        self.sync = bool(last)         # False: accumulate only; finish() reduces what is left

    def _on_grad_ready(self, p):
        """Post-accumulate hook: launch the bucket's all-reduce once its last grad is final."""
        if not (self.sync and self.overlap) or self.group.size == 1:
            return
        b = self.bucket_of[id(p)]
        b.ready += 1
        if b.ready == len(b.params):
            # all-reduce (avg) of one bucket over the dp group: bucket numel elements, non-blocking
            b.request = self.group.iall_reduce_(b.buffer, op="avg")

    def finish(self):
        """Wait for in-flight buckets; reduce any bucket that never launched. Then g = mean_r g_r."""
        if self.group.size == 1:
            return
        for b in self.buckets:
            if b.request is None:
                # all-reduce (avg) over the dp group, blocking: bucket numel elements
                self.group.all_reduce_(b.buffer, op="avg")
            else:
                b.request.wait()
            b.request, b.ready = None, 0

    def grad_volume_elements(self):
        """Elements all-reduced per step: Phi (the ledger then shows 2 Phi (N-1)/N sent)."""
        return int(np.sum([b.buffer.size for b in self.buckets]))
