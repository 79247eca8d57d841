"""Every tutorial runs as a notebook on the MPI ranks its first line names (ipyparallel MPI
engines, executed by nbclient), and on one rank an MPI tutorial says in one line what it needs.

Run by `make test-notebooks`, which installs the optional extra (minipar[notebook]) first."""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.notebook

TUTORIALS = sorted((pathlib.Path(__file__).parent.parent / "tutorials").glob("[0-9][0-9]_*.py"))


def converter():
    """tutorials/notebook.py as a module (the tutorials folder is not a package)."""
    spec = importlib.util.spec_from_file_location("tutorial_notebook", TUTORIALS[0].parent / "notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def outputs(nb):
    """Every text output of the notebook's code cells, in order."""
    texts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            texts.append(out.get("text") or out.get("data", {}).get("text/plain", ""))
    return "".join(texts)


# a cluster start and a whole tutorial on a busy 2-core machine; longer than a cell's timeout
# (300 s), so a stuck cell fails inside the test and its engines are still stopped
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs_as_a_notebook_on_its_ranks(path, tmp_path):
    for module in ("ipyparallel", "jupytext", "nbclient", "ipykernel"):
        pytest.importorskip(module, reason="needs the notebook extra: pip install -e '.[notebook]'")
    nb_mod = converter()
    n = nb_mod.ranks(path)
    nb = nb_mod.to_notebook(path)
    if n is not None:
        nb_mod.stop_cluster(path)           # leftovers of a run that was killed, if any
    try:
        nb_mod.execute(nb, tmp_path)        # raises CellExecutionError on any failed assertion, any rank
    finally:
        if n is not None:
            nb_mod.stop_cluster(path)       # engines of a failed run must not outlive the test
    text = outputs(nb)
    if n is not None:
        assert f"{n} MPI engines ready" in text
        assert all(cell.source.startswith("%%px") for cell in nb.cells[1:-1] if cell.cell_type == "code")
        assert "[stdout:0]" in text         # rank 0's output came back from its engine
    assert "passed" in text.lower() or n is None, "the tutorial's closing check did not print"


@pytest.mark.parametrize("path", [p for p in TUTORIALS if "-n " in p.read_text().split("\n", 1)[0]],
                         ids=lambda p: p.stem)
def test_on_one_rank_an_mpi_tutorial_says_what_it_needs(path):
    n = path.read_text().split("\n", 1)[0].split("-n ")[1].split()[0]
    run = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120,
                         env={"OPENBLAS_NUM_THREADS": "1", "PATH": str(pathlib.Path(sys.executable).parent)})
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert lines == [lines[-1]] and f"needs {n} ranks" in lines[-1] and "Traceback" not in run.stderr, \
        (run.stdout + run.stderr)
