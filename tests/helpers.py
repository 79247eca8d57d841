"""What several test files share: the tasks, tiny model configs, optimizer settings and seeds
of each strategy's parity runs, so a bug zoo runs exactly the setup of its strategy's tests.

Import from any test file (pytest puts tests/ on sys.path), never from another test file:

    from helpers import TASK, tp_config, TP_RUN

Each strategy's `*_RUN` holds the keyword arguments its tests give minipar.lockstep.lockstep:

    lockstep(tp_config(2), Layout(tp=2), steps=2, grid=grid, device=device, **TP_RUN)

The grids themselves come from fixtures (tests/conftest.py: grid_of, pipeline_group, device).
"""
from minipar import autograd
from minipar.data import ReverseTask
from minipar.engine import Engine, OnDevice, OptimConfig
from minipar.memory import measure_alive
from minipar.nn import GPTConfig

TASK = ReverseTask(n_digits=4)                       # token ids < 11, sequences of T = 8 tokens


# ----------------------------------------------------------------------------- tensor parallelism
TP_SEED = 5
TP_OPTIM = OptimConfig(lr=3e-3, weight_decay=0.1, max_norm=0.05)   # the clip is active: norm_owner matters
TP_RUN = dict(task=TASK, batch=8, optim=TP_OPTIM, seed=TP_SEED, tol=1e-11)   # tighter than TOLERANCE["fp64"]


def tp_config(tp=2, **kw):
    """A tiny GPT that tp ranks can split: n_head and vocab_size divisible by tp."""
    base = dict(vocab_size=16, seq_len=8, n_layer=2, n_head=max(4, tp), d_model=4 * max(4, tp),
                precision="fp64")
    return GPTConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- context parallelism
CP_TASK = ReverseTask(n_digits=8)                    # T = 16 tokens: cuts into 2*cp chunks for cp <= 8
CP_SEED = 5
CP_OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1)
CP_RUN = dict(task=CP_TASK, optim=CP_OPTIM, seed=CP_SEED)


def cp_config(n_layer=2, dropout=0.0, **kw):
    """A tiny GPT: 8 heads (Ulysses: tp*cp <= 8), d_model 16, T = 16."""
    return GPTConfig(**{**dict(vocab_size=16, seq_len=CP_TASK.seq_len, n_layer=n_layer, n_head=8, d_model=16,
                               dropout=dropout, precision="fp64"), **kw})


# ----------------------------------------------------------------------------- expert parallelism
EP_SEED = 5
EP_OPTIM = OptimConfig(lr=1e-2, weight_decay=0.1, max_norm=0.05)   # the clip is active at this size
EP_RUN = dict(task=TASK, optim=EP_OPTIM, seed=EP_SEED)


def ep_config(experts=8, k=2, n_layer=2, capacity=None, coef=0.1, moe_every=1):
    return GPTConfig(vocab_size=16, seq_len=8, n_layer=n_layer, n_head=4, d_model=16, experts=experts,
                     top_k=k, aux_loss_coef=coef, capacity_factor=capacity, moe_every=moe_every)


# ----------------------------------------------------------------------------- ZeRO
ZERO_SEED = 1
ZERO_SHAPE = dict(vocab_size=11, seq_len=8, n_layer=2, n_head=3, d_model=9)   # Φ = 2367: odd everywhere


def zero_config(precision="fp64", **kw):
    return GPTConfig(**{**ZERO_SHAPE, **kw}, precision=precision)


def zero_run(optim=None):
    """lockstep's keyword arguments of a ZeRO parity run (default optimizer: plain AdamW)."""
    return dict(task=TASK, optim=optim or OptimConfig(), seed=ZERO_SEED)


def zero_engine(grid, layout, device, precision="fp64", optim=None, **kw):
    """One sharded Engine of the ZeRO tests' model on `grid` (no serial oracle)."""
    return Engine(zero_config(precision, **kw), layout, optim or OptimConfig(), ZERO_SEED, grid, device=device)


def alive_beyond_activations(engine, step=1):
    """tracemalloc: bytes allocated by one forward and still alive after it, minus the saved
    activations the ledger counts; and the bytes of one Block's gathered parameters."""
    engine.zero_grad()
    x, y = OnDevice(TASK, engine.xp).batch(step, engine.local_indices(2 * engine.layout.dp)[0])
    with measure_alive() as alive, autograd.track_saved(engine.ledger):
        loss = engine.model.loss(x, y)
        extra = alive.now() - engine.ledger.current("activation")
        loss.backward()
    engine.sync.finish()
    return extra, engine.optimizer.part.units[-1].padded * engine.optimizer.param_shard.itemsize
