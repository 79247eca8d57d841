# minipar: `make` lists the targets. A fresh machine needs only python3 + pip:
# the first target that needs it builds .venv with numpy, mpi4py and MPICH.

PY      ?= .venv/bin/python
MPIEXEC ?= .venv/bin/mpiexec
NP      ?= 8
# run MPI ranks as `python -m mpi4py`: an uncaught exception on any rank
# aborts the whole job instead of leaving the other ranks waiting
MPIPY   := $(PY) -m mpi4py
PYTEST  := -m pytest -p no:cacheprovider -q
VENV    := .venv/.installed

# one BLAS thread per rank, so NP ranks on a small machine don't fight
export OPENBLAS_NUM_THREADS := 1
export OMP_NUM_THREADS      := 1
export MKL_NUM_THREADS      := 1
# MPICH: a rank waiting in MPI sleeps briefly (nanosleep) instead of spinning, so 8 ranks
# on 2 cores leave the cores to the ranks that compute (default job: 0.59x the wall time)
export MPIR_CVAR_ENABLE_HEAVY_YIELD := 1

STRATEGIES := dp tp pp zero offload 3d cp ep
# the parts a grader runs: core (autograd, ops, optimizer, memory, comm, checkpoints) and every strategy
PARTS := core $(STRATEGIES)
# what a part builds on besides core (make grade: a failure there blocks it, see tests/grade.py)
BUILDS_ON := offload:zero 3d:dp,tp,pp,zero,offload

.PHONY: help install train compare plan test test-notebooks notebooks test-gpu bench-gpu test-serial test-mpi $(addprefix test-,$(PARTS)) grade tutorials readme-layout bench bench-torch torch-venv clean

help:  ## list the targets
	@echo "minipar make targets (variables: PY=$(PY) MPIEXEC=$(MPIEXEC) NP=$(NP))"
	@echo "  install       create .venv and install minipar[test,mpich] (editable)"
	@echo "  train         $(MPIEXEC) -n 8 python -m mpi4py -m minipar.train"
	@echo "  test          serial tests, then MPI tests on $(NP) ranks, then tutorials"
	@echo "  test-gpu      the suite and a training run with CuPy (needs a GPU and minipar[gpu])"
	@echo "  bench-gpu     benchmarks/bench_device.py: CuPy vs NumPy step time, ranks sharing the GPU"
	@echo "  test-serial   tests not marked mpi"
	@echo "  test-mpi      tests marked mpi, on $(NP) ranks"
	@echo "  $(addprefix test-,$(PARTS))"
	@echo "                one part's tests (serial + MPI), e.g. as a grader"
	@echo "  grade         every part graded: results.json (Gradescope) and a table (PARTS=\"tp\" for one)"
	@echo "  tutorials     run every tutorials/NN_*.py (rank count from its first line)"
	@echo "  test-notebooks  every tutorial as a notebook on its MPI ranks (installs minipar[notebook])"
	@echo "  notebooks     write every tutorial as notebooks/NN_*.ipynb (MPI engines via ipyparallel)"
	@echo "  bench         benchmarks/run.py (against PyTorch too, if .venv-torch exists)"
	@echo "  bench-torch   benchmarks/bench_torch.py --table: minipar/torch per step at every shape"
	@echo "  torch-venv    .venv-torch with $(TORCH) (optional; only the benchmarks use it)"
	@echo "  compare       python -m minipar.compare on 8 ranks: the comparison table, measured"
	@echo "  plan          python -m minipar.plan --params 7.5e9 --gpus 64"
	@echo "  readme-layout rewrite the README's layout block from the tree (tests/test_readme_layout.py)"
	@echo "  clean         remove .venv, caches and outputs"

install: $(VENV)

$(VENV): setup.cfg pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test,mpich]'
	touch $@

train: $(VENV)
	$(MPIEXEC) -n 8 $(MPIPY) -m minipar.train

# serial first (fast failures), then MPI, then the tutorials (as notebooks on MPI engines), in that order
test: $(VENV)
	$(PY) $(PYTEST) -m "not mpi and not notebook"
	timeout 1200 $(MPIEXEC) -n $(NP) $(MPIPY) $(PYTEST) -m mpi
	@echo "== the MPI parity suite again, on minipar.strict (a CPU stand-in that enforces CuPy's rules)"
	timeout 1200 $(MPIEXEC) -n $(NP) $(MPIPY) $(PYTEST) -m mpi --device strict
	$(MAKE) test-notebooks

# on a machine with a GPU and CuPy (pip install -e '.[gpu]'): the parity suite with CuPy arrays,
# ranks sharing the GPU, then a short training run on it
test-gpu: $(VENV)
	$(PY) $(PYTEST) -m "not mpi" --device gpu
	for n in 1 2 4 8; do timeout 1200 $(MPIEXEC) -n $$n $(MPIPY) $(PYTEST) -m mpi --device gpu || exit 1; done
	$(MPIEXEC) -n 8 $(MPIPY) -m minipar.train --device gpu --steps 100 --check

bench-gpu: $(VENV)
	$(MPIEXEC) -n 1 $(MPIPY) benchmarks/bench_device.py --device gpu
	$(MPIEXEC) -n 4 $(MPIPY) benchmarks/bench_device.py --device gpu

test-serial: $(VENV)
	$(PY) $(PYTEST) -m "not mpi and not notebook"

test-mpi: $(VENV)
	timeout 1200 $(MPIEXEC) -n $(NP) $(MPIPY) $(PYTEST) -m mpi

# test-core, test-dp, test-tp, ...: serial tests of that marker, then the MPI ones.
# pytest exits 5 when a marker selects no tests; only that code is forgiven.
$(addprefix test-,$(PARTS)): test-%: $(VENV)
	$(PY) $(PYTEST) -m "$* and not mpi" || [ $$? -eq 5 ]
	timeout 1200 $(MPIEXEC) -n $(NP) $(MPIPY) $(PYTEST) -m "$* and mpi" || [ $$? -eq 5 ]

# every part's serial and MPI tests (the selections of test-<part>), one line per failing
# property, a table, and results.json in Gradescope's format; full logs in reports/grade/
grade: $(VENV)
	$(PY) tests/grade.py --parts "$(PARTS)" --builds-on "$(BUILDS_ON)" --np $(NP) --python $(PY) \
	  --mpiexec $(MPIEXEC) --out results.json

# the README's "How the code is laid out" block, generated from every module's docstring
readme-layout: $(VENV)
	$(PY) tests/test_readme_layout.py --write

# each tutorial's first line is its command, e.g.
#   # mpirun -n 4 python -m mpi4py tutorials/03_collectives.py
# files whose first line names no `-n N` run serially
tutorials: $(VENV)
	@set -e; for f in tutorials/[0-9][0-9]_*.py; do \
	  [ -e "$$f" ] || continue; \
	  n=$$(head -n 1 "$$f" | sed -n 's/.* -n \([0-9][0-9]*\).*/\1/p'); \
	  if [ -z "$$n" ]; then \
	    echo "== $$f (serial)"; $(PY) "$$f"; \
	  else \
	    echo "== $$f (-n $$n)"; timeout 600 $(MPIEXEC) -n $$n $(MPIPY) "$$f"; \
	  fi; \
	done

# the tutorials as notebooks (tutorials/notebook.py): each on the ranks its first line names, as
# ipyparallel MPI engines started with the venv's mpiexec; every cell runs on all of them (%%px)
NOTEBOOK_EXTRA := .venv/.notebook
$(NOTEBOOK_EXTRA): $(VENV) setup.cfg
	$(PY) -m pip install -e '.[notebook]'
	touch $@

test-notebooks: $(NOTEBOOK_EXTRA)  ## every tutorial executed as a notebook with nbclient, on its MPI ranks
	timeout 1200 $(PY) $(PYTEST) -m notebook tests/test_notebooks.py

notebooks: $(NOTEBOOK_EXTRA)  ## write notebooks/NN_*.ipynb; open them with jupyter (pip install jupyterlab)
	$(PY) tutorials/notebook.py tutorials/[0-9][0-9]_*.py --out notebooks

bench: $(VENV)
	$(PY) benchmarks/run.py

# minipar against PyTorch eager, in turns, at every shape of bench_torch.TABLE (needs .venv-torch)
bench-torch: $(VENV)
	$(PY) benchmarks/bench_torch.py --table

# the optional PyTorch for the comparison: its own venv, never a dependency of minipar
TORCH ?= torch==2.13.0
torch-venv:
	python3 -m venv .venv-torch
	.venv-torch/bin/pip install '$(TORCH)' numpy

compare: $(VENV)  ## every strategy on the same model, measured side by side (8 ranks)
	$(MPIEXEC) -n 8 $(MPIPY) -m minipar.compare

plan: $(VENV)  ## the ZeRO paper's memory figure, computed
	$(PY) -m minipar.plan --params 7.5e9 --gpus 64

clean:
	rm -rf .venv build *.egg-info .pytest_cache .hypothesis out reports results.json notebooks
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
