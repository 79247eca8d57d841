"""ProcessGrid: layout validation, rank arithmetic, and (under MPI) every group's members."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipar.comm.group import Group
from minipar.comm.grid import ProcessGrid, default_layout, grid_coords, grid_rank
from minipar.layout import check_grid
from minipar.parity import agree


pytestmark = pytest.mark.core   # the core part (make test-core): the serial machinery everything builds on

def factorizations(n):
    """Every (dp, pp, tp) with dp * pp * tp == n."""
    return [(n // (pp * tp), pp, tp) for pp in range(1, n + 1) for tp in range(1, n + 1)
            if n % (pp * tp) == 0]


# ----------------------------------------------------------------------------- serial
@pytest.mark.parametrize("layout, message", [
    ((2, 2, 1), r"--dp 2 x --pp 2 x --cp 1 x --tp 1 = 4 ranks does not match the 1 ranks"),
    ((0, 1, 1), r"--dp 0 must be an integer >= 1"),
    ((1, -1, 1), r"--pp -1 must be an integer >= 1"),
    ((1, 1, 1.5), r"--tp 1.5 must be an integer >= 1"),
])
def test_bad_layouts_raise_one_clear_line(layout, message):
    with pytest.raises(ValueError, match=message) as info:
        ProcessGrid(Group.single(), *layout)
    assert "\n" not in str(info.value)


@given(dp=st.integers(1, 5), pp=st.integers(1, 5), tp=st.integers(1, 5))
def test_rank_arithmetic_is_a_bijection_with_tp_fastest(dp, pp, tp):
    ranks = [grid_rank(d, p, t, pp, tp) for d in range(dp) for p in range(pp) for t in range(tp)]
    assert ranks == list(range(dp * pp * tp))        # (d, p, t) in lexicographic order: tp fastest
    assert all(grid_coords(r, pp, tp) == (r // (pp * tp), r // tp % pp, r % tp) for r in ranks)
    assert all(grid_rank(*grid_coords(r, pp, tp), pp, tp) == r for r in ranks)


def test_default_layouts():
    assert [default_layout(n) for n in (1, 2, 4, 8, 16)] == [(1, 1, 1), (2, 1, 1), (2, 1, 2), (2, 2, 2), (4, 2, 2)]
    for n in range(1, 33):
        dp, pp, tp = default_layout(n)
        check_grid(n, dp, pp, tp)


def test_factorizations_of_8():
    assert len(factorizations(8)) == 10 and (2, 2, 2) in factorizations(8)


def test_serial_grid():
    grid = ProcessGrid(Group.single(), 1, 1, 1)
    assert (grid.dp_rank, grid.pp_rank, grid.tp_rank) == (0, 0, 0)
    assert grid.is_first_stage and grid.is_last_stage and grid.next_rank is None and grid.prev_rank is None
    assert grid.embed is None and grid.tp_group.size == grid.dp_group.size == 1
    assert "dp=1 pp=1 tp=1" in grid.describe()


# ----------------------------------------------------------------------------- MPI
@pytest.mark.mpi
@pytest.mark.parametrize("layout", factorizations(8))
def test_groups_hold_the_right_ranks(world, layout):
    if world.size != 8:
        pytest.skip("written for 8 ranks")
    dp, pp, tp = layout
    grid = ProcessGrid(world, dp, pp, tp)
    d, p, t = grid.dp_rank, grid.pp_rank, grid.tp_rank
    want = {
        "tp": [grid_rank(d, p, i, pp, tp) for i in range(tp)],
        "pp": [grid_rank(d, i, t, pp, tp) for i in range(pp)],
        "dp": [grid_rank(i, p, t, pp, tp) for i in range(dp)],
        "mp": [grid_rank(d, i, j, pp, tp) for i in range(pp) for j in range(tp)],
    }
    groups = {"tp": grid.tp_group, "pp": grid.pp_group, "dp": grid.dp_group, "mp": grid.mp_group}
    problems = [f"{name} group {list(g.ranks)} != {want[name]}" for name, g in groups.items()
                if list(g.ranks) != want[name] or g.name != name]
    coords = {"tp": t, "pp": p, "dp": d, "mp": p * tp + t}
    problems += [f"rank in {name} group is {g.rank}, want {coords[name]}" for name, g in groups.items()
                 if g.rank != coords[name]]
    # the groups really talk: summing world ranks over each gives the sum of its members
    for name, g in groups.items():
        total = g.all_reduce(np.array([float(world.rank)]))[0]
        if total != sum(want[name]):
            problems.append(f"all_reduce over {name} = {total}, want {sum(want[name])}")
    is_end = p in (0, pp - 1)
    if pp > 1 and is_end:
        want_embed = [grid_rank(d, 0, t, pp, tp), grid_rank(d, pp - 1, t, pp, tp)]
        if grid.embed is None or list(grid.embed.ranks) != want_embed:
            problems.append(f"embed group {grid.embed} != {want_embed}")
    elif grid.embed is not None:
        problems.append(f"embed group {grid.embed} on a rank that holds no embedding")
    if (grid.prev_rank, grid.next_rank) != (p - 1 if p > 0 else None, p + 1 if p < pp - 1 else None):
        problems.append(f"prev/next {grid.prev_rank}/{grid.next_rank} at stage {p} of {pp}")
    agree(world, not problems, "; ".join(problems))


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4])
def test_grid_on_a_sub_group(group_of, n):
    """A grid over a block of ranks: groups list COMM_WORLD ranks, coordinates are block-local."""
    block = group_of(n)
    grid = ProcessGrid(block, *default_layout(n))
    first = block.ranks[0]
    want_tp = [first + grid.rank_of(grid.dp_rank, grid.pp_rank, i) for i in range(grid.tp)]
    agree(block, list(grid.tp_group.ranks) == want_tp, f"tp group {grid.tp_group.ranks} != {want_tp}")
    agree(block, f"{first + n - 1:>5}" in grid.describe(), grid.describe())


@pytest.mark.mpi
def test_inconsistent_layout_raises_on_every_rank_before_any_collective(world):
    with pytest.raises(ValueError, match="does not match"):
        ProcessGrid(world, world.size, 2, 1)
    world.barrier()  # still in step: nobody entered a Split
