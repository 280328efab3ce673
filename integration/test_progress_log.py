"""What an operator sees in a log: the quickstart's step 5 (CPU; its NN as the shipped manifest sets it,
with one tree library to queue behind it) with stderr going to a file, read while it runs.

A line must come within ``progress_interval_s`` of a batch's start and then at least that often while the
batch trains; model types waiting for their group say so; time left is there before half-way, goes
down, and at half-way is within a factor 2 of the truth; a resumed study says what it resumes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

INTERVAL_S = 2.0
SLACK_S = 2.0  # a loaded 2-core CI machine: the heartbeat thread may wake late
_LEFT = re.compile(r"^nn .*~(\d+)s left")


def _run(tmp_path: Path, trials: int, name: str) -> tuple[list[tuple[float, str]], float, int]:
    """Run step 5; returns the stderr lines with the second each was first seen, the run's seconds, exit code."""
    params = {"model_types": ["nn", "lightgbm"], "trials": trials, "output_dir": str(tmp_path / "out"),
              "devices": "cpu", "tree_rounds": 40, "progress": True, "progress_interval_s": INTERVAL_S,
              "refit_best": False}  # --params replaces these keys of the shipped manifest's; the NN's stay
    env = dict(os.environ, WATCHER_CACHE_DIR=str(tmp_path / "cache"), WATCHER_LEASE_DIR=str(tmp_path / "leases"))
    log = tmp_path / f"{name}.log"
    seen: list[tuple[float, str]] = []
    started = time.monotonic()
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "watcher_plugins.agent", "--run-pipeline", "--start-step", "5",
                                 "--end-step", "5", "--params", json.dumps(params)],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        while True:
            finished = proc.poll() is not None
            lines = log.read_text().splitlines()
            seen += [(time.monotonic() - started, line) for line in lines[len(seen):]]
            if finished:
                break
            time.sleep(0.1)
    return seen, time.monotonic() - started, proc.returncode


def test_a_log_gets_lines_while_work_goes_on_queued_types_say_so_and_a_resume_says_what_it_resumes(tmp_path):
    shipped = json.loads((Path(__file__).parents[1] / "agent_manifests" / "reinforcement.json").read_text())["params"]
    assert (shipped["trials"], shipped["ask_batch_size"]) == (4, 4), "the quickstart's one NN batch of 4 trials"
    seen, _, code = _run(tmp_path, 4, "first")
    assert code == 0, seen
    lines = [line for _, line in seen]
    assert "lightgbm  queued after nn" in lines
    start = next(i for i, line in enumerate(lines) if line == "nn: training a batch of 4 trials")
    end = next(i for i, line in enumerate(lines) if line.startswith("nn        4/4 trials"))
    during = seen[start:end + 1]
    assert seen[end][0] - seen[start][0] > 3 * INTERVAL_S, "the NN batch was too short to show a heartbeat"
    gaps = [later - earlier for (earlier, _), (later, _) in zip(during, during[1:])]
    assert max(gaps) <= INTERVAL_S + SLACK_S, (gaps, during)
    heartbeats = [line for _, line in during if line.startswith("nn        0/4 trials")]
    assert len(heartbeats) >= 2 and all("(training a batch of 4 trials)" in line for line in heartbeats)

    # Time left while the batch trains (the NN worker reports its share of the batch done): there is an estimate
    # before half-way, it goes down, and at half-way it is within a factor 2 of what was really left.
    batch_start, batch_end = seen[start][0], seen[end][0]
    estimates = [(t, int(m.group(1))) for t, line in during
                 if "(training a batch" in line and (m := _LEFT.match(line))]
    assert estimates and estimates[0][0] < batch_start + 0.5 * (batch_end - batch_start), (estimates, during)
    assert estimates[-1][1] < estimates[0][1], estimates
    # At half-way through the batch, the estimate is within a factor 2 of what was really left.
    half_way = batch_start + 0.5 * (batch_end - batch_start)
    at, left = min(estimates, key=lambda estimate: abs(estimate[0] - half_way))
    truth = batch_end - at
    assert truth / 2 <= left <= 2 * truth, (at - batch_start, left, truth, estimates)

    seen, _, code = _run(tmp_path, 6, "resumed")
    assert code == 0
    lines = [line for _, line in seen]
    assert "resuming study compare_models-nn: 4 of 6 trials complete, 2 to run" in lines
    assert "resuming study compare_models-lightgbm: 4 of 6 trials complete, 2 to run" in lines
