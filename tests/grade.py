# python tests/grade.py --parts "core dp tp pp zero offload 3d" --np 8 --out results.json   (make grade)
"""The grader: run every part, write a Gradescope results.json, print a short table.

For each part (a marker; `make grade` passes the Makefile's STRATEGIES list, so a new part
is graded as soon as it has a marker and a `make test-<part>`), the part's serial tests
run, then its MPI tests on --np ranks: the same selections as `make test-<part>`. The
collector (tests/grading.py) records each PROPERTY (one test function, every case of it)
and the one-line cause of each failure; the full pytest output goes to
reports/grade/<part>.log, never to the screen.

A part BUILDS ON others (--builds-on, from the Makefile: 3d on dp, tp, pp, zero, offload;
offload on zero; every part on core). A failing property that runs the code of another
failing part (one it builds on, or one whose marker its test also carries) is BLOCKED by
it: reported, named after the part that fails on its own (the root), and not scored
(max_score 0) until that part passes. So one planted mistake costs the points of its own
part only: with f's all-reduce removed, tp fails and the 3d tests that run TP are blocked.

results.json (Gradescope's format): {"score", "output", "execution_time", "tests": [one entry
per property per part: name, score, max_score, status, output]}. A property is worth one
point. A run that dies (a crash, a test stalled past its timeout) loses the properties
it never reached: one failed entry says so, naming the test it was in and the log's last
line. Hypothesis does not shrink here (profile minipar-grade): the first failing example
is the verdict, and shrinking would outlast the per-test timeout.
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
    cmd = [args.python, *PYTEST, "-m", select, "--grade-json", str(out), "--grade-part", part,
           "--hypothesis-profile=minipar-grade"]
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
    """The properties of one part (the collector's dicts), and its wall time. A run that died
    adds one failing property saying so."""
    (logs / f"{part}.log").write_text("")
    props, seconds = [], 0.0
    for half in ("serial", "mpi"):
        data, rc, took = run_half(part, half, args, logs)
        seconds += took
        props += (data or {}).get("properties", [])
        # 5: no test selected; else the run must have finished (a test stalled past pytest-timeout's
        # limit ends the job with exit code 1 too, before the collector could say it was done)
        if rc != 5 and not (data or {}).get("complete"):
            why = "ran past the timeout" if rc in (124, 137) else f"ended with exit code {rc}"
            if (data or {}).get("running"):
                why += f" in {data['running']}"
            props.append({"module": half, "function": "", "name": f"the {half} run completes",
                          "parts": [part], "cases": 1, "failed": 1, "skipped": 0,
                          "causes": [f"the {half} run {why} before its last test: "
                                     f"{last_line(logs / f'{part}.log')} (full output: {logs / f'{part}.log'})"]})
    return props, seconds


def parse_builds_on(text, parts):
    """'3d:dp,tp offload:zero' -> {part: set of parts it builds on}; core under every other part."""
    deps = {p: ({"core"} if p != "core" and "core" in parts else set()) for p in parts}
    for item in text.split():
        part, _, on = item.partition(":")
        deps.setdefault(part, set()).update(q for q in on.split(",") if q)
    return deps


def blockers(part, prop, graded, deps):
    """The other parts whose failures may explain this failing property: parts it builds on, or
    whose marker its test carries, that fail in a test of their own (one carrying no other
    part's marker: so two parts never block each other through a test they share)."""
    suspects = (deps.get(part, set()) | set(prop["parts"])) - {part}
    return {q for q in suspects if any(p["failed"] and p["parts"] == [q] for p in graded.get(q, []))}


def roots(part, graded, deps, seen=()):
    """The parts that fail on their own behind `part`'s failures (following blocked ones)."""
    found = set()
    for prop in graded.get(part, []):
        if not prop["failed"]:
            continue
        by = blockers(part, prop, graded, deps)
        if not by:
            found.add(part)
        for q in by - set(seen) - {part}:
            found |= roots(q, graded, deps, (*seen, part))
    return found


def entry(part, prop, blocked_by=()):
    failed, skipped, cases = prop["failed"], prop["skipped"], prop["cases"]
    if failed:
        first, others = prop["causes"][0], distinct_causes(prop["causes"]) - 1
        count = f"{failed} of {cases} cases fail" if cases > 1 else "fails"
        output = f"{count}: {first}" + (f" (+{others} other causes, see the log)" if others else "")
    elif skipped == cases:
        output = "skipped (needs more ranks?)"
    else:
        output = f"holds ({cases} case{'s' if cases > 1 else ''})"
    if blocked_by:
        output = (f"not scored: blocked by the failing part{'s' if len(blocked_by) > 1 else ''} "
                  f"{', '.join(sorted(blocked_by))} (this test runs its code; fix it first). {output}")
    return {"name": f"{part}: {prop['name']} [{prop['module']}]", "score": 0 if failed else 1,
            "max_score": 0 if blocked_by else 1, "status": "failed" if failed else "passed", "output": output}


def build_results(graded, seconds, deps, parts, elapsed):
    """(Gradescope's results dict, the lines to print: failing properties per part, then the table)."""
    tests, rows, lines = [], [], []
    for part in parts:
        entries, behind = [], set()
        for prop in graded[part]:
            by = blockers(part, prop, graded, deps) if prop["failed"] else set()
            root = set().union(*(roots(q, graded, deps, (part,)) for q in by)) or by
            behind |= root
            entries.append(entry(part, prop, root))
        tests += entries
        score, most = sum(e["score"] for e in entries), sum(e["max_score"] for e in entries)
        state = "FAIL" if score < most else ("blocked by " + ", ".join(sorted(behind)) if behind else "")
        rows.append((part, score, most, seconds[part], state))
        failing = [e for e in entries if e["status"] == "failed"]
        if failing:
            lines.append(f"-- {part}: {state}")
        lines += [f"   {'FAIL' if e['max_score'] else 'BLOCKED'} {e['name'][len(part) + 2:]}: {e['output']}"
                  for e in failing]
    total, most = sum(r[1] for r in rows), sum(r[2] for r in rows)
    table = ["part      score     time"] + [f"{p:<8} {s:>4}/{n:<4} {t:5.0f} s   {state}"
                                            for p, s, n, t, state in rows]
    table.append(f"{'total':<8} {total:>4}/{most:<4} {elapsed:5.0f} s")
    results = {"score": total, "execution_time": round(elapsed, 1), "output": "\n".join(table), "tests": tests}
    return results, lines + table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--parts", default="core dp tp pp zero offload 3d",
                    help="parts to grade, space-separated (markers in setup.cfg)")
    ap.add_argument("--builds-on", default="offload:zero 3d:dp,tp,pp,zero,offload",
                    help="part:part,part,... what each part builds on (core: under every part)")
    ap.add_argument("--np", type=int, default=8, help="MPI ranks for each part's MPI tests")
    ap.add_argument("--out", default="results.json", help="where results.json goes")
    ap.add_argument("--logs", default="reports/grade", help="folder for each part's full pytest output")
    ap.add_argument("--python", default=sys.executable, help="the Python that runs pytest")
    ap.add_argument("--mpiexec", default=str(Path(sys.executable).parent / "mpiexec"), help="MPI launcher")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds before one MPI run is ended")
    args = ap.parse_args(argv)
    logs = (REPO / args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    start, graded, seconds = time.monotonic(), {}, {}
    parts = args.parts.split()
    for part in parts:
        graded[part], seconds[part] = grade_part(part, args, logs)
        failing = sum(1 for p in graded[part] if p["failed"])
        print(f"== {part}: {len(graded[part]) - failing}/{len(graded[part])} properties hold "
              f"({seconds[part]:.0f} s; full output in {args.logs}/{part}.log)", flush=True)
    deps = parse_builds_on(args.builds_on, parts)
    results, lines = build_results(graded, seconds, deps, parts, time.monotonic() - start)
    print("\n".join(lines))
    out = Path(args.out) if os.path.isabs(args.out) else REPO / args.out
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results.json written to {out}")
    return 0 if all(t["score"] == t["max_score"] for t in results["tests"]) else 1


if __name__ == "__main__":
    sys.exit(main())
