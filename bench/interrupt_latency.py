"""How long `watcher-agent` takes to exit after SIGTERM mid-batch, for one or more installs of the package.

A container runtime sends SIGTERM and, after a grace period (docker stop: 10 s), SIGKILL: the agent must
mark its unfinished trials and write summary.json within it. For each PYTHONPATH given (an install of
some commit of this package), this starts step 5 (NN only, by default), waits until the first fold result
is in trials.jsonl, so that a batch is training, sends SIGTERM to the agent alone (as `docker stop` and
`kill` do, not to its process group), and records the seconds until it exits, its exit code, whether
summary.json says interrupted, and whether any process it started is still alive.

    python3 bench/interrupt_latency.py --out results.json --install old=/tmp/pkg_old --install new=/tmp/pkg \\
        --params '{"data": {"embedded": "survivors", "rows": 98784}, "folds": 5, "trials": 20, "model_types": ["nn"]}'
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from watcher_plugins.orphans import processes_with_environment


def measure(label: str, pythonpath: str, params: dict, repeat: int) -> list[dict]:
    runs = []
    for attempt in range(repeat):
        work = Path(tempfile.mkdtemp(prefix=f"interrupt-{label}-"))
        marker = uuid.uuid4().hex
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p),
               "WATCHER_BENCH_MARKER": marker}
        run_params = {**params, "output_dir": str(work / "out"), "lease_dir": str(work / "leases"), "progress": False}
        command = [sys.executable, "-m", "watcher_plugins.agent", "--run-pipeline", "--start-step", "5",
                   "--end-step", "5", "--params", json.dumps(run_params)]
        with (work / "agent.err").open("w") as err:
            agent = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=err)
            trials = work / "out" / "trials.jsonl"
            started = time.monotonic()
            while agent.poll() is None and not (trials.exists() and trials.read_text().strip()):
                time.sleep(0.05)
            first_result_s = time.monotonic() - started
            if agent.poll() is not None:
                raise SystemExit(f"{label}: the agent ended (exit {agent.returncode}) before a result: see {work}")
            signalled = time.monotonic()
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(timeout=600)
            exit_s = time.monotonic() - signalled
        time.sleep(1.0)  # a worker still dying is not one left behind
        summary_path = work / "out" / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        runs.append({"install": label, "attempt": attempt, "first_result_s": round(first_result_s, 2),
                     "exit_after_sigterm_s": round(exit_s, 2), "exit_code": code,
                     "summary_interrupted": summary.get("interrupted"),
                     "processes_left": len(processes_with_environment(marker)),
                     "trials_recorded": len(trials.read_text().splitlines()) if trials.exists() else 0})
        print(json.dumps(runs[-1]), flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--install", action="append", required=True, metavar="LABEL=PYTHONPATH",
                        help="an install of the package to measure (repeatable; measured in the order given)")
    parser.add_argument("--params", default='{"model_types": ["nn"]}', help="step 5 params (JSON object)")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    params = json.loads(args.params)
    results = []
    for install in args.install:
        label, _, pythonpath = install.partition("=")
        results += measure(label, pythonpath, params, args.repeat)
    Path(args.out).write_text(json.dumps({"params": params, "runs": results}, indent=2) + "\n")
    print(f"{'install':<8} {'exit after SIGTERM s':>21} {'code':>5} {'interrupted':>12} {'left':>5}")
    for run in results:
        print(f"{run['install']:<8} {run['exit_after_sigterm_s']:>21} {run['exit_code']:>5} "
              f"{run['summary_interrupted']!s:>12} {run['processes_left']:>5}")


if __name__ == "__main__":
    main()
