"""Request: a pending non-blocking call (isend, irecv_, iall_reduce_) until `wait()`.

A Group's non-blocking methods return one. It holds the mpi4py request, the work left
to do once the data has arrived (copy a staged buffer back to the device, divide by the
group size for "avg") and the buffers MPI still reads or writes, kept alive until then.
"""


class Request:
    """A pending non-blocking call; `wait()` completes it (and finishes staging / averaging)."""

    def __init__(self, mpi_request=None, finish=None, keep=None):
        self._request, self._finish, self._keep = mpi_request, finish, keep

    def _complete(self):
        self._request, finish, self._finish, self._keep = None, self._finish, None, None
        if finish is not None:
            finish()

    def test(self):
        """True once complete (then finished as by wait); never blocks."""
        if self._request is not None and self._request.Test():
            self._complete()
        return self._request is None

    def wait(self):
        if self._request is not None:
            self._request.Wait()
            self._complete()

    @staticmethod
    def wait_all(requests):
        for request in requests:
            request.wait()
