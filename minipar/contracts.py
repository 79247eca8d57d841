"""The two interfaces through which the engine drives its strategies.

engine.py calls nothing else on them: no hasattr checks, no attribute of a
strategy set from outside. Every implementation defines every method.

    GradientSync        LocalGrads (one replica), DataParallel (DDP buckets), Zero0-3
      zero_grad()                   before a step's first backward
      set_last_micro_batch(last)    before each micro-batch's backward: communicate now?
      finish()                      after the last backward: gradients are final

    ModelOptimizer      AdamW, SGD (optim.py, whole local parameters), Zero0-3 (a dp shard;
                        parallel/zero/stage*.py, made by zero/stages.make_zero; and Offload)
      t                             the optimizer's step count (Adam's bias correction)
      shards_gradients              True: grad_stats covers this rank's dp shard only
      step(grad_scale)              one update with every gradient times grad_scale
      grad_stats()                  [sum of g^2, count of non-finite g] over the entries it owns
      state()                       {name: {"master", "m", "v" | "momentum"}}, local shapes, whole
      load_state(state, t)          the inverse: {name: {"param", "master"?, ...}}, local shapes
      gathered()                    a context in which every p.data and p.grad is whole

A state array is shaped like the rank's local parameter (its tensor/pipeline
slice of the serial one), never like a dp shard: checkpoints and parity
checks see the same thing under every ZeRO stage.
"""
from abc import ABC, abstractmethod


class GradientSync(ABC):
    """Makes the local gradients the global mean gradient (or this rank's shard of it)."""

    @abstractmethod
    def zero_grad(self):
        """Clear the gradients before a step's first backward."""

    @abstractmethod
    def set_last_micro_batch(self, last):
        """`last`: the coming backward is the step's last, so gradients may be communicated
        as they become final; False during gradient accumulation (and inside a pipeline
        schedule, whose micro-batches interleave: finish() syncs them all)."""

    @abstractmethod
    def finish(self):
        """After the last backward: complete the sync."""


class ModelOptimizer(ABC):
    """Updates the parameters and owns their optimizer state."""

    t = 0                       # steps taken
    shards_gradients = False    # grad_stats() covers a dp shard: the engine sums it over the world

    @abstractmethod
    def step(self, grad_scale=1.0):
        """One update with every gradient multiplied by grad_scale (1/S times the clip factor)."""

    @abstractmethod
    def grad_stats(self):
        """np.array([sum of squared gradients, number of non-finite gradients]) in float64."""

    @abstractmethod
    def state(self):
        """{serial name: {"master", "m", "v"} (Adam) or {"master", "momentum"} (SGD)}: whole
        arrays in the local parameter's shape (collective under ZeRO: gathered over dp)."""

    @abstractmethod
    def load_state(self, state, t):
        """Set parameters and optimizer state from {name: {"param", "master"?, "m"?, "v"?,
        "momentum"?}} arrays in the local parameter's shape, on the parameters' device; a
        missing master is the parameter, missing moments are zeros. No communication."""

    @abstractmethod
    def gathered(self):
        """Context manager: inside, every local p.data and p.grad (the averaged gradient) is
        whole on this rank, as without ZeRO (collective under ZeRO)."""


class LocalGrads(GradientSync):
    """The sync of a run with one replica: nothing to communicate, gradients only cleared."""

    def __init__(self, params):
        self.params = list(params)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def set_last_micro_batch(self, last):
        pass

    def finish(self):
        pass
