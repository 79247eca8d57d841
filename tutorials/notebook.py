# python tutorials/notebook.py tutorials/07_zero.py --out notebooks --run
"""A tutorial as a Jupyter notebook that runs on real MPI ranks.

Each tutorials/NN_*.py stays the one source (jupytext percent format: `# %%` cells).
This file turns it into a notebook whose ranks are real MPI processes, the way the
Jupyter ecosystem does MPI: ipyparallel starts N engines with `mpiexec -n N` (the
venv's MPICH; no flags needed as root) and every tutorial cell runs on all of them
with the `%%px` magic, so `Group.world()` has N ranks, collectives really move
bytes, and a failing assertion on any rank fails the cell. N is read from the
tutorial's first line (`# mpirun -n 4 python -m mpi4py tutorials/07_zero.py`);
a tutorial whose first line names no `-n N` becomes a plain one-kernel notebook.

    python tutorials/notebook.py tutorials/07_zero.py --out notebooks          # write notebooks/07_zero.ipynb
    python tutorials/notebook.py tutorials/0*.py --out notebooks --run         # ... and execute them (nbclient)
    jupyter lab notebooks/07_zero.ipynb                                        # or open it and run the cells

Needs the optional extra: pip install -e '.[notebook]' (ipyparallel, jupytext,
nbclient, ipykernel). `make test-notebooks` installs it and runs every tutorial so.
"""
import argparse
import pathlib
import re
import sys

SETUP = '''\
# This notebook runs on {n} MPI ranks, as `{command}` does.
# ipyparallel starts {n} engines under mpiexec (MPI engines); every cell below runs on all
# of them (%%px), so Group.world() has {n} ranks. Output is shown per engine: [stdout:k].
import os
import sys

import ipyparallel as ipp

# the venv's mpiexec sits next to its python: put it first on PATH for ipyparallel's MPI launcher
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
cluster = ipp.Cluster(engines="mpi", n={n}, cluster_id="{cluster_id}", log_level=40)
rc = cluster.start_and_connect_sync()
rc.wait_for_engines({n}, timeout={timeout})
view = rc[:]
view.block = True   # each %%px cell waits for every engine and raises if any rank failed
view.activate()     # %%px runs on these engines
print(f"{{len(rc.ids)}} MPI engines ready")'''

TEARDOWN = '''\
cluster.stop_cluster_sync()   # end the {n} engines and their controller'''


def ranks(path) -> int | None:
    """N of the `-n N` on the tutorial's first line, or None (a serial tutorial)."""
    first = pathlib.Path(path).read_text().split("\n", 1)[0]
    found = re.search(r"\s-n\s+(\d+)", first)
    return int(found.group(1)) if found else None


def cluster_id(path) -> str:
    """The ipyparallel cluster id a tutorial's notebook uses (so a caller can stop it)."""
    return "minipar-" + pathlib.Path(path).stem


def to_notebook(path, timeout: int = 300):
    """The tutorial at `path` as an nbformat notebook: on N ranks, a setup cell that starts
    N MPI engines, each code cell prefixed with %%px, and a cell that stops the engines."""
    import jupytext
    import nbformat
    nb = jupytext.read(str(path), fmt="py:percent")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    n = ranks(path)
    if n is None:
        return nb
    command = pathlib.Path(path).read_text().split("\n", 1)[0].lstrip("# ").strip()
    cells = list(nb.cells)
    if cells and cells[0].cell_type == "code" and cells[0].source.strip().startswith("#") \
            and "\n" not in cells[0].source.strip():
        cells = cells[1:]                  # the run-command line: the setup cell says it instead
    for cell in cells:
        if cell.cell_type == "code":
            cell.source = "%%px\n" + cell.source
    setup = SETUP.format(n=n, command=command, cluster_id=cluster_id(path), timeout=timeout)
    nb.cells = [nbformat.v4.new_code_cell(setup)] + cells + \
        [nbformat.v4.new_code_cell(TEARDOWN.format(n=n))]
    return nb


def stop_cluster(path) -> None:
    """Stop the engines of `path`'s notebook if they still run (after a failed cell)."""
    import ipyparallel as ipp
    try:
        cluster = ipp.Cluster.from_file(cluster_id=cluster_id(path))
    except FileNotFoundError:
        return                              # stopped already, or never started
    cluster.stop_cluster_sync()


def execute(nb, cwd, timeout: int = 300):
    """Run every cell with nbclient in a fresh python3 kernel; raises CellExecutionError
    (with the failing cell's traceback, every engine's) if a cell fails."""
    from nbclient import NotebookClient
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def main(argv=None):
    p = argparse.ArgumentParser(prog="tutorials/notebook.py", description=__doc__.split("\n")[0])
    p.add_argument("tutorials", nargs="+", help="tutorials/NN_*.py files")
    p.add_argument("--out", default="notebooks", help="folder for the .ipynb files")
    p.add_argument("--run", action="store_true", help="also execute each notebook (nbclient)")
    args = p.parse_args(argv)
    import nbformat
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in args.tutorials:
        nb = to_notebook(path)
        target = out / (pathlib.Path(path).stem + ".ipynb")
        if args.run:
            try:
                execute(nb, pathlib.Path.cwd())
            finally:
                if ranks(path) is not None:
                    stop_cluster(path)
        nbformat.write(nb, target)
        print(f"{'ran and wrote' if args.run else 'wrote'} {target} "
              f"({ranks(path) or 1} rank{'s' if ranks(path) else ''})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
