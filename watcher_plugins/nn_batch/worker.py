"""The NN worker process: JSON-lines requests on stdin, replies on stdout (protocol.py).

    echo '{"command": "ping"}' | CUDA_VISIBLE_DEVICES=0 python -m watcher_plugins.nn_batch.worker

It holds its GPU's lease for its whole life (the OS frees it if the process dies), initialises CUDA
once, and keeps datasets on the device between batches; it ends within a second of its host process
(orphans.exit_with_parent), mid-batch too. It never imports a tree library. stdout
carries protocol lines only: the protocol writes to a private copy of file descriptor 1, and fd 1
itself is pointed at stderr, so whatever a library prints lands on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import BinaryIO

from watcher_plugins.devices import available_cores, physical_gpu_count, pin_environment
from watcher_plugins.errors import LeaseError, ProtocolError
from watcher_plugins.lease import GpuLease
from watcher_plugins.nn_batch import protocol
from watcher_plugins.nn_batch.protocol import Request
from watcher_plugins.orphans import exit_with_parent
from watcher_plugins.stdio import claim_stdout

TREE_LIBRARIES = ("catboost", "lightgbm", "xgboost")
EXIT_FATAL = 3
EXIT_NO_LEASE = 4


class Worker:
    def __init__(self, out: BinaryIO, runner, device_name: str, gpu: int | None):
        self.out = out
        self.runner = runner
        self.device_name = device_name
        self.gpu = gpu

    def send(self, reply: dict) -> None:
        self.out.write(protocol.encode(reply))

    def _pong(self) -> dict:
        import torch

        return {"event": "pong", "status": "ok", "device": self.device_name, "gpu_lease": self.gpu,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "pid": os.getpid(), "torch": torch.__version__, "datasets_cached": len(self.runner.cache),
                "threads": torch.get_num_threads(),
                "tree_libraries_loaded": sorted(name for name in TREE_LIBRARIES if name in sys.modules)}

    def _result(self, outcome) -> dict:
        line = {"event": "result", "trial_number": outcome.key[0], "fold_idx": outcome.key[1],
                "status": outcome.status, "score": outcome.score, "seconds": round(outcome.seconds, 4),
                "epochs": outcome.epochs, "best_epoch": outcome.best_epoch}
        if outcome.error:
            line["error"] = outcome.error
        if outcome.info:
            line["info"] = outcome.info
        return line

    def _train(self, request: Request) -> dict | None:
        """Run a train or train_batch request; return a fatal line if the device broke."""
        from watcher_plugins.nn_batch.batch import is_fatal_device_error

        settings = request.settings
        if request.command == "train":  # the single-trial path: one fit, the reference trainer
            settings = dataclasses.replace(settings, n_concurrent=1, strategy="serial")
        try:
            progress = self.send if request.command == "train_batch" else None
            summary = self.runner.run(request.jobs, settings, lambda outcome: self.send(self._result(outcome)),
                                      progress)
        except Exception as exc:
            if is_fatal_device_error(exc):
                return protocol.fatal_line(protocol.FATAL_CUDA, f"{type(exc).__name__}: {exc}")
            self.send(protocol.error_line(protocol.E_INTERNAL, f"{type(exc).__name__}: {exc}"))
            return None
        if request.command == "train_batch":
            self.send({"event": "batch_done", "status": "ok", **summary})
        return None

    def _refit(self, request: Request) -> dict | None:
        """Run a refit request (nn_batch/refit.py): a result line per fold, then a refit_done line; return
        a fatal line if the device broke."""
        from watcher_plugins.nn_batch.batch import is_fatal_device_error
        from watcher_plugins.nn_batch.refit import run_refit

        assert request.refit is not None  # protocol.parse_request gives a refit request its job
        try:
            output = run_refit(self.runner, request.refit, request.jobs, request.settings,
                               lambda outcome: self.send(self._result(outcome)))
            arrays = output.write_arrays()
        except Exception as exc:
            if is_fatal_device_error(exc):
                return protocol.fatal_line(protocol.FATAL_CUDA, f"{type(exc).__name__}: {exc}")
            self.send(protocol.error_line(protocol.E_INTERNAL, f"{type(exc).__name__}: {exc}"))
            return None
        self.send({"event": "refit_done", "status": output.result.status, "result": output.result.to_json(),
                   "arrays": arrays})
        return None

    def serve(self, stdin: BinaryIO) -> int:
        """Serve until shutdown or end of input (exit 0), or a fatal device error (exit 3)."""
        while True:
            raw = stdin.readline(protocol.MAX_LINE_BYTES + 1)
            if not raw:
                return 0
            if len(raw) > protocol.MAX_LINE_BYTES and not raw.endswith(b"\n"):
                size = len(raw)
                while raw and not raw.endswith(b"\n"):  # skip the rest of the oversized line
                    raw = stdin.readline(protocol.MAX_LINE_BYTES)
                    size += len(raw)
                self.send(protocol.error_line(protocol.E_LINE_TOO_LONG, f"request line of at least {size} bytes: "
                                                                        f"the limit is {protocol.MAX_LINE_BYTES}"))
                continue
            line = raw.rstrip(b"\r\n")
            try:  # a blank line too is no request: it gets an error line, as DESIGN.md's protocol says
                request = protocol.parse_request(line)
            except ProtocolError as exc:
                self.send(protocol.error_line(exc.code, str(exc)))
                continue
            if request.command == "shutdown":
                self.send({"event": "bye", "status": "ok"})
                return 0
            if request.command == "ping":
                self.send(self._pong())
                continue
            fatal = self._refit(request) if request.command == "refit" else self._train(request)
            if fatal is not None:
                self.send(fatal)
                return EXIT_FATAL


def _gpu_to_hold(device: str) -> int | None:
    """The GPU a worker started without --gpu trains on, so the one whose lease it must hold: the first
    GPU CUDA_VISIBLE_DEVICES lists (CUDA's device 0), or GPU 0 where it is unset and there is a GPU.
    None for the CPU, for an empty list, and for GPUs named by UUID."""
    if device == "cpu":
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        # NVML, not CUDA: initialising CUDA now would fix the visible devices before they are narrowed.
        return 0 if device == "cuda" or physical_gpu_count() > 0 else None
    first = visible.split(",")[0].strip()
    return int(first) if first.isdigit() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m watcher_plugins.nn_batch.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to train (auto: the GPU if CUDA is available)")
    parser.add_argument("--gpu", type=int, default=None,
                        help="physical index (in PCI bus order) of the GPU whose lease this worker holds and "
                             "that it trains on: CUDA_VISIBLE_DEVICES is narrowed to it (default: the first GPU "
                             "CUDA_VISIBLE_DEVICES lists, or GPU 0 where it is unset and the host has a GPU; "
                             "none on --device cpu)")
    parser.add_argument("--lease-dir", default=None)
    parser.add_argument("--lease-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    out = claim_stdout(binary=True)
    # Before the lease: an orphan must neither train on, nor wait for, a GPU.
    exit_with_parent()

    def fatal(code: str, message: str, exit_code: int) -> int:
        out.write(protocol.encode(protocol.fatal_line(code, message)))
        return exit_code

    gpu = args.gpu if args.gpu is not None else _gpu_to_hold(args.device)
    if gpu is not None and args.device != "cpu":
        # Narrowed to the GPU it holds, before torch is imported: CUDA must see that GPU alone (it would
        # otherwise train on CUDA's device 0 of several, holding no lease for it: --gpu 1 under a
        # CUDA_VISIBLE_DEVICES=0,1 set by hand, say).
        pin_environment(os.environ, gpu)
    lease = None
    if gpu is not None:
        try:
            lease = GpuLease(gpu, args.lease_dir, args.lease_timeout, purpose=f"nn_batch worker pid {os.getpid()}")
            lease.acquire()
        except LeaseError as exc:
            return fatal(protocol.FATAL_LEASE, str(exc), EXIT_NO_LEASE)
    try:
        try:
            import torch

            from watcher_plugins import faults
            from watcher_plugins.nn_batch.batch import BatchRunner

            # torch sizes its CPU thread pool by the cores it sees, blind to a container's CPU quota; a
            # thread count the user set in the environment stands.
            if not any(os.environ.get(var) for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
                torch.set_num_threads(len(available_cores()))

            use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
            if use_cuda and not torch.cuda.is_available():
                return fatal(protocol.FATAL_STARTUP, "--device cuda: CUDA is not available in this process", 1)
            device = torch.device("cuda:0" if use_cuda else "cpu")
            name = f"cuda:0 ({torch.cuda.get_device_name(0)})" if use_cuda else "cpu"
            if use_cuda:
                torch.zeros(1, device=device)  # initialise CUDA now, once
            runner = BatchRunner(device, faults.current())  # faults: for tests only
        except Exception as exc:  # noqa: BLE001 - reported on the protocol, then the process ends
            return fatal(protocol.FATAL_STARTUP, f"{type(exc).__name__}: {exc}", 1)
        return Worker(out, runner, name, gpu).serve(sys.stdin.buffer)
    finally:
        if lease is not None:
            lease.release()


if __name__ == "__main__":
    sys.exit(main())
