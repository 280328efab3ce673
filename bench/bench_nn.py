"""Benchmark of the nn_batch trainers on the survivors-98k workload (a benchmark, not a test).

98,784 x 62 rows, 5 folds, 20 trials drawn from search_spaces.suggest_nn with a fixed seed, at most
200 epochs, patience 20: 100 fits. serial, streams and fused run in one process on one GPU, with
the same fits; for each: model-epochs/s (epochs each fit really needed, up to its early stop), wall
seconds, peak allocated memory, GPU utilisation sampled with NVML (when pynvml imports), and the R^2
shift of tf32/bf16 against fp32. Which arms run over all fits and which over a subset of the trials
(--subset-every) is chosen by --full-arms / --subset-arms, so that a run fits a short device lease;
the speedup at the same precision and on the same fits is fused over serial on the subset, beside
fused (all fits) over serial (subset). nn_bench.json is rewritten after every arm. Then the whole
20-trial batch runs through the executor (worker process, persistent and warm) for the end-to-end
seconds, at each of --e2e-precisions.

    PYTHONPATH=. python bench/bench_nn.py --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import torch

from watcher_plugins.data import FULL_ROWS
from watcher_plugins.nn_batch.batch import TRAINERS
from watcher_plugins.nn_batch.budget import VramBudget
from watcher_plugins.nn_batch.device_data import DeviceDatasetCache
from watcher_plugins.nn_batch.fused import FusedTrainer
from watcher_plugins.nn_batch.oom import train_with_oom_recovery
from watcher_plugins.nn_batch.protocol import FitJob
from watcher_plugins.nn_batch.training import FitTask, TrainSettings, precision_context
from watcher_plugins.records import STATUS_OK, DataRef
from watcher_plugins.search_spaces import suggest_nn


class UtilisationSampler:
    """GPU utilisation (%) from NVML every ``period`` seconds while running; empty without pynvml."""

    def __init__(self, gpu: int = 0, period: float = 0.05):
        self.samples: list[int] = []
        self.period = period
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(gpu)
        except Exception:  # noqa: BLE001 - NVML is optional
            self._nvml = None

    def __enter__(self):
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(int(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._nvml is not None:
            self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {"nvml": self._nvml is not None, "samples": 0}
        return {"nvml": True, "samples": len(self.samples), "mean_pct": round(float(np.mean(self.samples)), 1),
                "max_pct": int(max(self.samples))}


def set_tiles(spec: str) -> str:
    """Sets one precision's pack-kernel tiles from PRECISION=rows,units,inner,warps,stages,dot (a tuning
    arm); returns the precision."""
    from watcher_plugins.nn_batch import pack_kernels

    precision, values = spec.split("=")
    *numbers, dot = values.split(",")
    pack_kernels.TILES[precision] = pack_kernels.Tiles(*map(int, numbers), dot=dot)
    return precision


def draw_trials(n: int, seed: int) -> list[dict]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    return [suggest_nn(study.ask()) for _ in range(n)]


def fit_jobs(trials: list[dict], folds: int, seed: int, data: DataRef, only: set[int] | None = None) -> list[FitJob]:
    return [FitJob(t, f, folds, seed, tuple(p["hidden_layers"]), p["lr"], p["weight_decay"], p["dropout"], data)
            for t, p in enumerate(trials) if only is None or t in only for f in range(folds)]


def run_config(strategy: str, precision: str, jobs: list[FitJob], cache: DeviceDatasetCache, device, args) -> dict:
    settings = TrainSettings(args.max_epochs, args.patience, precision)
    if strategy in ("fused", "fused-eager"):  # packs sized by the calibrated VRAM budget, as "auto" does;
        # fused-eager: without CUDA graphs, to measure what replaying a captured epoch gains
        trainer = FusedTrainer(settings, device, budget=VramBudget.for_device(device, 0.85),
                               cuda_graphs=strategy == "fused")
    else:
        trainer = TRAINERS[strategy](settings, device)
    tasks = [FitTask.build(job, cache.get(job.data)) for job in jobs]
    n_concurrent = 1 if strategy == "serial" else (args.streams if strategy == "streams" else len(tasks))
    outcomes = {}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    with UtilisationSampler() as sampler, precision_context(precision, device):
        started = time.perf_counter()
        report = train_with_oom_recovery(trainer, tasks, n_concurrent, lambda o: outcomes.__setitem__(o.key, o))
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    needed = sum(o.epochs for o in outcomes.values())
    row = {
        "strategy": strategy, "precision": precision, "fits": len(tasks), "n_concurrent": n_concurrent,
        "wall_s": round(wall, 3), "model_epochs": needed, "model_epochs_run": trainer.model_epochs,
        "model_epochs_per_s": round(needed / wall, 1),
        "peak_mem_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 3) if cuda else None,
        "gpu_util": sampler.summary(), "oom_retries": report.oom_retries, "ok": sum(o.status == STATUS_OK for o in outcomes.values()),
        "r2": {f"{k[0]}/{k[1]}": o.score for k, o in sorted(outcomes.items())},
    }
    if isinstance(trainer, FusedTrainer):
        row["pack_sizes"], row["compactions"] = trainer.pack_sizes, trainer.compactions
        row["graph_captures"] = trainer.graph_captures
    print(f"{strategy:8s} {precision:5s} fits={len(tasks):3d} wall={wall:7.2f}s me/s={row['model_epochs_per_s']:8.1f} "
          f"peak={row['peak_mem_gib']}GiB util={row['gpu_util'].get('mean_pct')}", flush=True)
    return row


def launch_overhead_us(device: torch.device, count: int = 20_000) -> float:
    """Microseconds per tiny op issued from Python (an add on one element): what bounds a host-bound
    arm such as serial, which differs from machine to machine even with the same GPU."""
    x = torch.zeros(1, device=device)
    for _ in range(100):
        x.add_(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(count):
        x.add_(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return round((time.perf_counter() - started) * 1e6 / count, 2)


def r2_shift(row: dict, reference: dict) -> dict:
    diffs = [abs(row["r2"][k] - reference["r2"][k]) for k in row["r2"]
             if row["r2"][k] is not None and reference["r2"].get(k) is not None]
    return {"vs": f"{reference['strategy']} {reference['precision']}", "fits": len(diffs),
            "max_abs": max(diffs) if diffs else None, "mean_abs": float(np.mean(diffs)) if diffs else None}


def end_to_end(trials, args, out_dir: Path, precision: str) -> dict:
    from watcher_plugins.executor import RunContext
    from watcher_plugins.nn_batch.executor import NNBatchExecutor
    from watcher_plugins.records import TrialJob

    data = DataRef(embedded="survivors", rows=args.rows)
    jobs = [TrialJob("nn", t, p, data, args.folds, args.seed) for t, p in enumerate(trials)]
    params = {"nn_max_epochs": args.max_epochs, "nn_patience": args.patience, "precision": precision,
              "n_concurrent_nn": "auto", "nn_strategy": "auto"}
    context = RunContext(output_dir=out_dir / "e2e", devices=[0], lease_dir=out_dir / "e2e" / "leases")
    with NNBatchExecutor(params, context) as executor:
        started = time.perf_counter()
        executor.run_batch(jobs[:1])  # starts the worker, loads the data onto the GPU, warms up
        warmup = time.perf_counter() - started
        started = time.perf_counter()
        results = executor.run_batch(jobs)
        wall = time.perf_counter() - started
        summary = executor.last_batch_summaries
    print(f"executor {precision}: 20-trial batch {wall:.2f}s (worker start + first batch {warmup:.2f}s)", flush=True)
    return {"precision": precision, "batch_wall_s": round(wall, 3), "worker_start_and_warmup_s": round(warmup, 3),
            "ok": sum(r.status == STATUS_OK for r in results), "folds": len(results), "worker_summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=FULL_ROWS)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--patience", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--streams", type=int, default=5, help="concurrency of the streams trainer (the seed's N)")
    parser.add_argument("--subset-every", type=int, default=4, help="the subset: every k-th trial")
    parser.add_argument("--full-arms", default="fused:fp32,fused:tf32,fused:bf16,serial:fp32,streams:fp32",
                        help="strategy:precision arms over all fits, in this order (strategies: serial, "
                             "streams, fused, fused-eager = fused without CUDA graphs)")
    parser.add_argument("--subset-arms", default="serial:fp32,serial:tf32,serial:bf16,fused:fp32,fused:tf32,fused:bf16",
                        help="strategy:precision arms over the subset, in this order")
    parser.add_argument("--arm-order", choices=["full-first", "interleaved"], default="full-first",
                        help="interleaved: each precision's arms together (fp32 first), so a cut-off run keeps "
                             "whole comparisons")
    parser.add_argument("--e2e-precisions", default="fp32,bf16", help="precisions of the executor end-to-end batch")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--device", default="cuda:0", help="cpu only to try the script out; numbers need a GPU")
    parser.add_argument("--tiles", action="append", default=[],
                        help="PRECISION=rows,units,inner,warps,stages,dot: other fixed tiles for the pack kernels "
                             "of that precision (a tuning arm; nn_batch.pack_kernels.TILES)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    for spec in args.tiles:
        set_tiles(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_nn.py needs a CUDA GPU (or --device cpu to try it out)")
    args.out.mkdir(parents=True, exist_ok=True)
    data = DataRef(embedded="survivors", rows=args.rows)
    cache = DeviceDatasetCache(device)
    cache.get(data)
    trials = draw_trials(args.trials, args.seed)
    everything = fit_jobs(trials, args.folds, args.seed, data)
    subset = fit_jobs(trials, args.folds, args.seed, data, only=set(range(0, args.trials, args.subset_every)))

    def parse(arms: str) -> list[tuple[str, str]]:
        return [tuple(arm.split(":")) for arm in arms.split(",") if arm]

    arms = [(s_, p_, False) for s_, p_ in parse(args.full_arms)] + [(s_, p_, True) for s_, p_ in parse(args.subset_arms)]
    if args.arm_order == "interleaved":
        rank = {"fp32": 0, "tf32": 1, "bf16": 2}
        arms.sort(key=lambda a: rank[a[1]])  # stable: within a precision, the order given
    # Compilations (Triton's, one per kernel variant a shape needs), handles and cuBLAS's choices out of
    # the timings: each arm's trainer trains every fit of its arm for 3 epochs first (a cold arm ran at
    # half its speed: bench/results/2026-12-07-nn-pack-h100/README.md).
    for strategy, precision, on_subset in arms:
        warm = argparse.Namespace(**{**vars(args), "max_epochs": 3, "patience": 3})
        with contextlib.redirect_stdout(io.StringIO()):
            run_config(strategy, precision, subset if on_subset else everything, cache, device, warm)

    result = {
        "command": " ".join(["python", *sys.argv]),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "none (cpu try-out)",
        "torch": torch.__version__, "python": platform.python_version(), "tiles": args.tiles,
        "launch_overhead_us": launch_overhead_us(device),
        "workload": {"rows": args.rows, "folds": args.folds, "trials": args.trials, "max_epochs": args.max_epochs,
                     "patience": args.patience, "seed": args.seed, "trial_params": trials,
                     "subset_trials": sorted({j.trial_number for j in subset})},
        "ratio_method": "model-epochs/s = epochs each fit needed (to its early stop) / wall s of the arm. "
                        "fused_vs_serial_<p>_same_fits: fused over serial, both on the subset, both at precision p. "
                        "fused_vs_serial_<p>_full_vs_subset: fused over all fits at p over serial on the subset at p "
                        "(different fits: the subset's mix of widths moves serial's rate). "
                        "streams_vs_serial_fp32_same_fits: both on the subset. "
                        "fused_graphs_vs_eager_<p>_<fits>: fused replaying captured epochs over fused-eager "
                        "(the same trainer without CUDA graphs), same fits, same precision.",
        "ratios": {}, "r2_shift": {}, "runs": [], "executor_end_to_end": [],
    }
    rows = result["runs"]

    def find(strategy, precision, on_subset=False):
        return next((r for r in rows if r["strategy"] == strategy and r["precision"] == precision
                     and r.get("subset", False) == on_subset), None)

    def summarise() -> None:
        ratios, shifts = result["ratios"], result["r2_shift"]
        for precision in ("fp32", "tf32", "bf16"):
            serial = find("serial", precision, True)
            for name, fused in (("same_fits", find("fused", precision, True)),
                                ("full_vs_subset", find("fused", precision))):
                if serial and fused:
                    ratios[f"fused_vs_serial_{precision}_{name}"] = round(
                        fused["model_epochs_per_s"] / serial["model_epochs_per_s"], 2)
        for strategy in ("streams", "fused"):
            for on_subset in (True, False):
                serial, other = find("serial", "fp32", on_subset), find(strategy, "fp32", on_subset)
                tag = "same_fits" if on_subset else "all_fits"
                if serial and other:
                    ratios[f"{strategy}_vs_serial_fp32_{tag}"] = round(
                        other["model_epochs_per_s"] / serial["model_epochs_per_s"], 2)
                    shifts[f"{strategy}_fp32_vs_serial_fp32_{tag}"] = r2_shift(other, serial)
        for precision in ("fp32", "tf32", "bf16"):
            for on_subset in (False, True):
                graphed, eager = find("fused", precision, on_subset), find("fused-eager", precision, on_subset)
                if graphed and eager:
                    ratios[f"fused_graphs_vs_eager_{precision}_{'same_fits' if on_subset else 'all_fits'}"] = round(
                        graphed["model_epochs_per_s"] / eager["model_epochs_per_s"], 2)
        for precision in ("tf32", "bf16"):
            for on_subset in (False, True):
                low, ref = find("fused", precision, on_subset), find("fused", "fp32", on_subset)
                if low and ref:
                    shifts[f"fused_{precision}_vs_fused_fp32{'_subset' if on_subset else ''}"] = r2_shift(low, ref)
        (args.out / "nn_bench.json").write_text(json.dumps(result, indent=1))

    for strategy, precision, on_subset in arms:
        row = run_config(strategy, precision, subset if on_subset else everything, cache, device, args)
        if on_subset:
            row["subset"] = True
        rows.append(row)
        summarise()  # after every arm, so that a run cut off keeps what it measured
    if not args.skip_e2e and device.type == "cuda":
        for precision in parse_list(args.e2e_precisions):
            result["executor_end_to_end"].append(end_to_end(trials, args, args.out, precision))
            summarise()
    summarise()
    print("\nstrategy precision fits  wall_s  model-epochs/s  peak_GiB")
    for r in rows:
        print(f"{r['strategy']:8s} {r['precision']:5s} {r['fits']:4d}{'s' if r.get('subset') else ' '} "
              f"{r['wall_s']:7.2f} {r['model_epochs_per_s']:10.1f} {r['peak_mem_gib']}")
    print("launch overhead (us per tiny op):", result["launch_overhead_us"])
    print("ratios:", json.dumps(result["ratios"]))
    print("r2 shift (max abs):", json.dumps({k: v["max_abs"] for k, v in result["r2_shift"].items()}))
    print("end to end:", json.dumps([{k: v for k, v in e.items() if k != "worker_summary"}
                                     for e in result["executor_end_to_end"]]))
    return 0


def parse_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


if __name__ == "__main__":
    sys.exit(main())
