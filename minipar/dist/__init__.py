"""Communication: Group (the only mpi4py user), ring collectives, the process grid, verdicts."""
from minipar.dist.comm import CommLedger, Group, Request
from minipar.dist.grid import ProcessGrid, default_layout
from minipar.dist.verdict import VerdictError, agree, assert_close, max_rel_err

__all__ = ["CommLedger", "Group", "Request", "ProcessGrid", "default_layout",
           "VerdictError", "agree", "assert_close", "max_rel_err"]
