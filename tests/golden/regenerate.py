"""The survivors golden study: its params, the environment it runs in, how its trials.jsonl is made
comparable, and how the golden file is regenerated from a commit.

    python tests/golden/regenerate.py --commit 592990d

unpacks that commit (``git archive``), installs it into a folder of its own (``pip install --no-deps
--target``, so its own ``schemas/`` and ``agent_manifests/`` come with it and nothing resolves to this
checkout), runs that install's ``watcher-agent`` (step 5 only, PARAMS, ENV) in a temporary folder, and
writes its canonical trials.jsonl to tests/golden/survivors_trials.jsonl. The Python that runs it must
hold the package's dependencies and the tree libraries (``pip install .[trees]``, or tox's integration
env). ``integration/test_reproducible_survivors.py`` runs the installed package the same way and compares.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "survivors_trials.jsonl"

#: Every param that can change a result is given, so neither the shipped manifest nor a schema default
#: changing later moves the study. output_dir is added per run.
PARAMS: dict = {
    "compare_models": True,
    "model_types": ["nn", "catboost", "lightgbm", "xgboost"],
    "trials": 2,
    "folds": 3,
    "seed": 42,
    "ask_batch_size": 4,
    "data": {"embedded": "survivors", "rows": 1500},
    "devices": "cpu",
    "progress": False,
    "persistent_workers": True,
    "n_concurrent_nn": "auto",
    "nn_strategy": "auto",
    "precision": "fp32",
    "nn_max_epochs": 15,
    "nn_patience": 10,
    "tree_parallel_workers": 1,
    "tree_rounds": 60,
    "tree_early_stopping_rounds": 30,
}

#: tox's setenv (tox.ini), which CI runs under; the cache and lease folders are fresh per run.
ENV = {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WATCHER_BLOCK_PLUGINS": "*"}

#: A line's fields that are timings, not results.
TIMING_FIELDS = ("seconds",)


def canonical_lines(trials_jsonl: Path) -> list[str]:
    """trials.jsonl without its timings: each line without TIMING_FIELDS, its keys sorted, the lines
    sorted (they are written as folds finish, so their order is a timing too)."""
    lines = []
    for line in trials_jsonl.read_text().splitlines():
        record = json.loads(line)
        for name in TIMING_FIELDS:
            record.pop(name, None)
        lines.append(json.dumps(record, sort_keys=True))
    return sorted(lines)


def canonical_text(trials_jsonl: Path) -> str:
    return "".join(line + "\n" for line in canonical_lines(trials_jsonl))


def run_step_5(agent: list[str], workdir: Path, extra_env: dict[str, str] | None = None,
               timeout: float = 900) -> Path:
    """Run ``agent --run-pipeline`` (step 5, PARAMS) in workdir, under ENV; return its trials.jsonl."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **ENV, "WATCHER_CACHE_DIR": str(workdir / "cache"),
           "WATCHER_LEASE_DIR": str(workdir / "leases"), **(extra_env or {})}
    params = {**PARAMS, "output_dir": str(workdir / "out")}
    result = subprocess.run([*agent, "--run-pipeline", "--start-step", "5", "--end-step", "5",
                             "--params", json.dumps(params)],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"step 5 exited {result.returncode}:\n{result.stderr[-4000:]}")
    return workdir / "out" / "trials.jsonl"


_WHERE = """
import importlib.metadata as md, json, sys
import watcher_plugins, watcher_plugins.schemas, watcher_plugins.agent_manifests
print(json.dumps({"modules": [watcher_plugins.__file__, watcher_plugins.schemas.__file__,
                              watcher_plugins.agent_manifests.__file__],
                  "entry_points": [ep.value for ep in md.entry_points(group="watcher")],
                  "versions": {name: md.version(name) for name in
                               ("torch", "numpy", "optuna", "catboost", "lightgbm", "xgboost")}}))
"""


def regenerate(commit: str, out: Path, keep: Path | None = None) -> None:
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="watcher-golden-") as work:
            return regenerate(commit, out, Path(work) / "work")
    repo, work = HERE.parents[1], keep
    src, site = work / "src", work / "site"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit], check=True, capture_output=True)
    subprocess.run(["tar", "x", "-C", str(src)], input=archive.stdout, check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True)
    # That install alone is imported: PYTHONPATH puts it before this Python's own (maybe editable) copy.
    env = {"PYTHONPATH": str(site)}
    where = json.loads(subprocess.run([sys.executable, "-c", _WHERE], env={**os.environ, **ENV, **env},
                                      cwd=work, check=True, capture_output=True, text=True).stdout)
    for module in where["modules"]:
        if not Path(module).resolve().is_relative_to(site.resolve()):
            raise RuntimeError(f"{module} is not the install of {commit} in {site}")
    print(f"{commit}: watcher_plugins from {where['modules'][0]}; versions {where['versions']}", flush=True)
    agent = [str(site / "bin" / "watcher-agent")]  # that install's console script, on this Python
    started = time.perf_counter()
    trials = run_step_5(agent, work / "run", extra_env=env)
    print(f"step 5 ran in {time.perf_counter() - started:.1f} s", flush=True)
    out.write_text(canonical_text(trials))
    print(f"wrote {out} ({len(canonical_lines(trials))} lines)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="592990d", help="the commit whose step 5 makes the golden file")
    parser.add_argument("--out", type=Path, default=GOLDEN)
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it, instead of a temporary one")
    args = parser.parse_args()
    regenerate(args.commit, args.out, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
