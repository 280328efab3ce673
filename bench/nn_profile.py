"""Where a fused epoch's GPU time goes (a measurement, not a test).

Builds one fused pack of bench_nn.py's workload (survivors-98k, 5 folds, trials drawn as bench_nn.py
draws them), the largest architecture by default, runs a few warm-up epochs, then profiles
--epochs epochs with torch.profiler and prints the CUDA kernels by total time, with the epoch's
wall milliseconds (synchronised) beside them. ``--arch 64,32,16 --fits 5`` profiles the first 5 fits of
that architecture instead (repeat --arch for several packs); ``--graphs both`` profiles each pack with
and without replaying a captured epoch (CUDA graph).

    PYTHONPATH=. python bench/nn_profile.py --precision bf16 --out $OUT
    PYTHONPATH=. python bench/nn_profile.py --precision fp32 --arch 64,32,16 --arch 256,128 --fits 5 \
        --graphs both --out $OUT

``--tiles fp32=128,64,16,8,2,ieee`` (repeatable, bench_nn.py's spelling) profiles the same packs again
under other fixed tiles after the shipped ones: a tile sweep whose every arm is one process's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench_nn import draw_trials, fit_jobs, set_tiles
from watcher_plugins.data import FULL_ROWS
from watcher_plugins.nn_batch import pack_kernels as kernels
from watcher_plugins.nn_batch.device_data import DeviceDatasetCache
from watcher_plugins.nn_batch.pack import new_pack
from watcher_plugins.nn_batch.training import FitTask, TrainSettings, precision_context
from watcher_plugins.records import DataRef


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--arch", action="append", default=[],
                        help="hidden layers, e.g. 64,32,16 (default: the pack with the most work)")
    parser.add_argument("--fits", type=int, default=0, help="at most this many fits per pack (0: all)")
    parser.add_argument("--graphs", choices=["on", "off", "both"], default="on")
    parser.add_argument("--tiles", action="append", default=[],
                        help="PRECISION=rows,units,inner,warps,stages,dot: profile again under these tiles")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda:0")
    data_ref = DataRef(embedded="survivors", rows=FULL_ROWS)
    data = DeviceDatasetCache(device).get(data_ref)
    jobs = fit_jobs(draw_trials(20, 42), 5, 42, data_ref)
    by_arch: dict[tuple[int, ...], list] = {}
    for job in jobs:
        by_arch.setdefault(job.hidden_layers, []).append(job)
    archs = [tuple(int(w) for w in a.split(",")) for a in args.arch] or \
        [max(by_arch, key=lambda a: len(by_arch[a]) * FULL_ROWS * sum(a))]
    args.out.mkdir(parents=True, exist_ok=True)
    for variant, spec in enumerate([None, *args.tiles]):
        if spec is not None and set_tiles(spec) != args.precision:
            continue
        tiles = kernels.TILES[args.precision]
        for arch in archs:
            for graphs in both(args.graphs):
                fits = by_arch[arch][: args.fits or None]
                text = profile_pack([FitTask.build(job, data) for job in fits], arch, args, device,
                                    f"graphs {graphs}, {tiles}", graphs == "on")
                print(text)
                name = (f"nn_profile_{args.precision}_{'-'.join(map(str, arch))}_x{len(fits)}_graphs-{graphs}"
                        f"{f'_tiles{variant}' if variant else ''}.txt")
                (args.out / name).write_text(text)


def both(choice: str) -> list[str]:
    return ["on", "off"] if choice == "both" else [choice]


def profile_pack(tasks, arch, args, device, options, graphs) -> str:
    settings = TrainSettings(200, 10_000, args.precision)
    with precision_context(args.precision, device):
        pack = new_pack(tasks, settings, device)
        pack.capture_graph = graphs
        for _ in range(3):  # with graphs: the first is the capture's warm-up
            pack.run_epoch()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.epochs):
            pack.run_epoch()
        torch.cuda.synchronize()
        epoch_ms = (time.perf_counter() - started) * 1000 / args.epochs
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.epochs):
                pack.run_epoch()
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    return (f"pack: {len(tasks)} fits of {list(arch)} on {FULL_ROWS} rows, {args.precision}, {options}, "
            f"{epoch_ms:.2f} ms per epoch ({len(tasks) * 1000 / epoch_ms:.0f} model-epochs/s)\n{table}")


if __name__ == "__main__":
    main()
