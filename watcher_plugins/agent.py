"""The reference watcher-agent host and its CLI.

The real watcher framework is not available here; this host does what it does, through the public
hooks only: load the plugins, validate the manifest and --params, and run the registered pipeline
steps in the requested range.

    watcher-agent --run-pipeline --start-step 5 --end-step 5 [--manifest PATH] [--params JSON]
    watcher-agent predict --model OUTPUT_DIR/models/MODEL_TYPE --data FILE [--out FILE] [--format FMT]

``predict`` is a subcommand (the first argument), handled by watcher_plugins/predict.py; everything else
is the pipeline's flags, as before.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings
from collections.abc import Sequence

from watcher_plugins import __version__
from watcher_plugins.errors import ManifestError, StepRangeError, WatcherPluginError
from watcher_plugins.manager import get_plugin_manager
from watcher_plugins.manifest import load_manifest

PROG = "watcher-agent"
PREDICT = "predict"  # the subcommand


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run watcher pipeline steps registered by plugins, driven by a JSON manifest.",
        epilog="Predicting with a saved model: watcher-agent predict --model OUTPUT_DIR/models/MODEL_TYPE "
               "--data FILE [--out FILE] [--format FMT] (watcher-agent predict --help says more). "
               "Exit codes: 0 done, 1 a step failed, 2 bad input (manifest, --params, data, step range), "
               "130 interrupted.",
    )
    parser.add_argument("--run-pipeline", action="store_true", help="run the pipeline steps in the range")
    parser.add_argument("--start-step", type=int, default=1, metavar="N", help="first step to run (default 1)")
    parser.add_argument("--end-step", type=int, default=None, metavar="M",
                        help="last step to run (default: the last registered step)")
    parser.add_argument("--manifest", default=None, metavar="PATH",
                        help="the manifest (default: the shipped agent_manifests/reinforcement.json)")
    parser.add_argument("--params", default=None, metavar="JSON",
                        help="a JSON object whose keys override the manifest's params, validated the same way")
    parser.add_argument("--list-steps", action="store_true", help="list the registered steps and executors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _select_steps(steps: dict, start: int, end: int | None) -> list:
    if end is not None and end < start:
        raise StepRangeError(f"--start-step {start} is after --end-step {end}")
    last = max(steps, default=start)
    if end is None and last < start:
        raise StepRangeError(f"--start-step {start} is after the last registered step, {last}")
    end = last if end is None else end
    selected = [step for number, step in steps.items() if start <= number <= end]
    if not selected:
        listing = ", ".join(f"{n} ({s.name})" for n, s in steps.items()) or "none"
        raise StepRangeError(f"no registered pipeline step in the range {start}..{end}; registered steps: {listing}")
    return selected


def _list_registrations(pm) -> None:
    print("pipeline steps:")
    for number, step in pm.get_pipeline_steps().items():
        print(f"  {number}  {step.name}: {step.description}")
    print("executors:")
    for name, executor in pm.get_executors().items():
        print(f"  {name} ({', '.join(executor.model_types)}): {executor.description}")


def _terminate_as_interrupt(signum, frame):  # SIGTERM takes the same clean-up path as Ctrl-C
    raise KeyboardInterrupt(f"signal {signum}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning (a data file's high-cardinality column, say) as one line, as errors are, without the
    source file and line Python would print."""
    print(f"{PROG}: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    warnings.showwarning = _show_warning
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == [PREDICT]:
        from watcher_plugins import predict

        return predict.main(words[1:])
    args = build_parser().parse_args(words)
    try:
        pm = get_plugin_manager()
        if args.list_steps:
            _list_registrations(pm)
            return 0
        if not args.run_pipeline:
            build_parser().print_usage(sys.stderr)
            print(f"{PROG}: error: nothing to do: pass --run-pipeline (or --list-steps)", file=sys.stderr)
            return 2
        steps = _select_steps(pm.get_pipeline_steps(), args.start_step, args.end_step)
        manifest = load_manifest(args.manifest, args.params, pm)
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
        for step in steps:
            print(f"{PROG}: step {step.number} {step.name}", file=sys.stderr)
            step.load()(manifest.params, pm)
        return 0
    except ManifestError as exc:
        for problem in exc.problems:
            print(f"{PROG}: error: {problem}", file=sys.stderr)
        return exc.exit_code
    except WatcherPluginError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:  # a data file's problems: one line each
            print(f"{PROG}: error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        # True however early the interrupt came: finished trials are kept, unfinished ones asked again.
        print(f"{PROG}: interrupted; running it again resumes: only what did not finish runs", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
