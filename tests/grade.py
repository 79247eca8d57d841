# python tests/grade.py --parts "core dp tp pp zero offload 3d" --np 8 --out results.json   (make grade)
"""The grader: run every part, write a Gradescope results.json, print a short table.

For each part (a marker; `make grade` passes the Makefile's STRATEGIES list, so a new part
is graded as soon as it has a marker and a `make test-<part>`), the part's serial tests
run, then its MPI tests on --np ranks: the same selections as `make test-<part>`. The
collector (tests/grading.py) records each PROPERTY (one test function, every case of it)
and the one-line cause of each failure; the full pytest output goes to
reports/grade/<part>.log, never to the screen.

results.json (Gradescope's format): {"score", "output", "execution_time", "tests": [one entry
per property per part: name, score, max_score, status, output]}. A property is worth one
point. A part's MPI run that dies (a crash, a hang ended by the timeout) loses the
properties it never reached: one failed entry says so, with the log's last line.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from grading import distinct_causes

REPO = Path(__file__).resolve().parents[1]
PYTEST = ["-m", "pytest", "-p", "no:cacheprovider", "-q", "--tb=short"]


def run_half(part, half, args, logs):
    """One pytest session of one part (half "serial" or "mpi"): (its JSON or None, rc, seconds)."""
    out = logs / f"{part}.{half}.json"
    out.unlink(missing_ok=True)
    select = f"{part} and {'not ' if half == 'serial' else ''}mpi"
    cmd = [args.python, *PYTEST, "-m", select, "--grade-json", str(out), "--grade-part", part]
    if half == "mpi":
        cmd = ["timeout", str(args.timeout), args.mpiexec, "-n", str(args.np), args.python, "-m", "mpi4py",
               *cmd[1:]]
    start = time.monotonic()
    with open(logs / f"{part}.log", "a") as log:
        log.write(f"\n==== {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    data = json.loads(out.read_text()) if out.exists() else None
    return data, rc, seconds


def last_line(path):
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def grade_part(part, args, logs):
    """[Gradescope test entries] of one part, and its wall time."""
    (logs / f"{part}.log").write_text("")
    entries, seconds = [], 0.0
    for half in ("serial", "mpi"):
        data, rc, took = run_half(part, half, args, logs)
        seconds += took
        for prop in (data or {}).get("properties", []):
            entries.append(entry(part, prop))
        if rc not in (0, 1, 5):      # 1: some tests failed; 5: no test selected; else the run died
            why = "ran past the timeout" if rc in (124, 137) else f"ended with exit code {rc}"
            entries.append({"name": f"{part}: the {half} run completes", "score": 0, "max_score": 1,
                            "status": "failed",
                            "output": f"the {half} run {why} before its last test: {last_line(logs / f'{part}.log')} "
                                      f"(full output: {logs / f'{part}.log'})"})
    return entries, seconds


def entry(part, prop):
    failed, skipped, cases = prop["failed"], prop["skipped"], prop["cases"]
    if failed:
        first, others = prop["causes"][0], distinct_causes(prop["causes"]) - 1
        count = f"{failed} of {cases} cases fail" if cases > 1 else "fails"
        output = f"{count}: {first}" + (f" (+{others} other causes, see the log)" if others else "")
    elif skipped == cases:
        output = "skipped (needs more ranks?)"
    else:
        output = f"holds ({cases} case{'s' if cases > 1 else ''})"
    return {"name": f"{part}: {prop['name']} [{prop['module']}]", "score": 0 if failed else 1,
            "max_score": 1, "status": "failed" if failed else "passed", "output": output}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--parts", default="core dp tp pp zero offload 3d",
                    help="parts to grade, space-separated (markers in setup.cfg)")
    ap.add_argument("--np", type=int, default=8, help="MPI ranks for each part's MPI tests")
    ap.add_argument("--out", default="results.json", help="where results.json goes")
    ap.add_argument("--logs", default="reports/grade", help="folder for each part's full pytest output")
    ap.add_argument("--python", default=sys.executable, help="the Python that runs pytest")
    ap.add_argument("--mpiexec", default=str(Path(sys.executable).parent / "mpiexec"), help="MPI launcher")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds before one MPI run is ended")
    args = ap.parse_args(argv)
    logs = (REPO / args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    start, tests, rows = time.monotonic(), [], []
    for part in args.parts.split():
        entries, seconds = grade_part(part, args, logs)
        tests += entries
        score = sum(e["score"] for e in entries)
        rows.append((part, score, len(entries), seconds))
        print(f"== {part}: {score}/{len(entries)} properties hold ({seconds:.0f} s; log {args.logs}/{part}.log)",
              flush=True)
        for e in entries:
            if e["status"] == "failed":
                print(f"   FAIL {e['name'][len(part) + 2:]}: {e['output']}", flush=True)
    total, most = sum(r[1] for r in rows), sum(r[2] for r in rows)
    table = ["part      score   time"] + [f"{p:<8} {s:>3}/{n:<3} {t:5.0f} s" + ("" if s == n else "   FAIL")
                                          for p, s, n, t in rows]
    table.append(f"{'total':<8} {total:>3}/{most:<3} {time.monotonic() - start:5.0f} s")
    results = {"score": total, "execution_time": round(time.monotonic() - start, 1),
               "output": "\n".join(table), "tests": tests}
    out = Path(args.out) if os.path.isabs(args.out) else REPO / args.out
    out.write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(table))
    print(f"results.json written to {out}")
    return 0 if total == most else 1


if __name__ == "__main__":
    sys.exit(main())
