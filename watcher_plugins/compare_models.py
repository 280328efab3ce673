"""Step 5, compare_models: one Optuna study per model type, run through the executors.

Determinism (DESIGN.md, principle 1): each study asks its trials in batches of ``ask_batch_size`` in
a fixed order, the executor trains the batch however it likes, and the results are told in
trial-number order. The study's trajectory therefore depends on the manifest alone, never on the
concurrency, the strategy or the number of GPUs.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import optuna

from watcher_plugins.data import kfold_splits, load_dataset
from watcher_plugins.devices import resolve_devices
from watcher_plugins.errors import (
    DataError,
    ExecutorError,
    ManifestError,
    OutputDirError,
    PluginError,
    StorageLost,
)
from watcher_plugins.executor import Executor, RunContext
from watcher_plugins.gpu_monitor import GpuMonitor
from watcher_plugins.interrupts import interrupts_held
from watcher_plugins.manifest import sources, where
from watcher_plugins.progress import HEARTBEAT_S, ProgressBoard
from watcher_plugins.records import STATUS_OK, DataRef, FoldResult, RefitResult, TrialJob
from watcher_plugins.refit import BestTrial, RefitOutcome, refit_best, write_oof
from watcher_plugins.report import params_text, write_report
from watcher_plugins.storage import DEFAULT_DB, StudyStore
from watcher_plugins.tasks import METRICS, REGRESSION, Metric, metric_for
from watcher_plugins.types import DEFAULT_METRIC, ModelType, WatcherExecutor

logger = logging.getLogger(__name__)
TRIALS_FILE = "trials.jsonl"
SUMMARY_FILE = "summary.json"
GPU_SAMPLES_FILE = "gpu_samples.json"


@dataclass
class ModelTypeOutcome:
    """One leaderboard row."""

    model_type: str
    executor: str | None
    status: str  # "done" | "unavailable"
    best_score: float | None = None  # the best trial's mean fold score, by the run's metric
    best_trial: int | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    trials_complete: int = 0
    trials_failed: int = 0
    seconds: float = 0.0
    reason: str | None = None  # why the model type is unavailable, or its most common trial failure
    trials_running: int = 0  # still running in other agents sharing the study, when this one ended
    best_fold_scores: list[float | None] = field(default_factory=list)  # the best trial's, in fold order
    study_seconds: float = 0.0  # what every run of the study spent on it, this one's included (seconds: this run's)


class TrialLog:
    """trials.jsonl: one line per trial and fold, flushed as each fold finishes. A line names its score
    by the metric ("r2": 0.61, "logloss": 0.43)."""

    def __init__(self, path: Path, metric: str = "r2"):
        self._fh: TextIO = path.open("a", encoding="utf-8")
        self.metric = metric

    def write(self, result: FoldResult, study: str) -> None:
        line = {
            "study": study,  # several studies may share output_dir (study_name), each with a trial 0
            "trial_number": result.trial_number,
            "fold_idx": result.fold_idx,
            "model_type": result.model_type,
            self.metric: result.score,
            "seconds": round(result.seconds, 4),
            "status": result.status,
        }
        if result.error:
            line["error"] = result.error
        self._fh.write(json.dumps(line) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _data_ref(params: Mapping[str, Any]) -> DataRef:
    """The data param, with the task asked for where it is not auto (so that the embedded data's record,
    and with it every study's definition, reads as it did before tasks existed)."""
    task = params.get("task", "auto")
    return DataRef.from_param({**params["data"], **({"task": task} if task != "auto" else {})})


def _metric(params: Mapping[str, Any], dataset) -> Metric:
    """The metric this run optimises: the params', else the dataset's task's default."""
    try:
        return metric_for(dataset.task, params.get("metric"))
    except ValueError as exc:
        inferred = " (inferred from the target; set params.task to say otherwise)" if params.get("task", "auto") == "auto" else ""
        raise ManifestError([f"{where(params, 'metric')}: {exc}; the target {dataset.target!r} makes this a "
                             f"{dataset.task} task{inferred}"]) from None


def _check_folds(label: str, dataset, params: Mapping[str, Any], metric: Metric) -> list[tuple[Any, Any]]:
    """Folds on which the metric is defined: at least 2 held-out rows each; for R² a held-out target that
    varies; for classification a training part with two classes or more, and for AUC a held-out part too."""
    try:
        splits = kfold_splits(dataset.n_rows, params["folds"], params["seed"])
    except DataError as exc:
        raise DataError(f"{label}: {exc}") from None
    for k, (train, held_out) in enumerate(splits):
        y_val = dataset.y[held_out]
        if metric.name == "r2" and (y_val == y_val[0]).all():  # every model would score 0.0 there
            raise DataError(f"{label}: the {len(held_out)} held-out rows of fold {k} all have the target "
                            f"value {float(y_val[0]):g}, so R² is undefined there: use fewer "
                            f"folds or another seed")
        if dataset.task == REGRESSION:
            continue
        if len(set(dataset.y[train].tolist())) < 2:
            raise DataError(f"{label}: the training rows of fold {k} hold one class only "
                            f"({dataset.classes[int(dataset.y[train][0])]!r}): use fewer folds or another seed")
        if metric.name == "auc" and len(set(y_val.tolist())) < 2:
            raise DataError(f"{label}: the held-out rows of fold {k} hold one class only "
                            f"({dataset.classes[int(y_val[0])]!r}), so AUC is undefined there: use fewer folds, "
                            f"another seed or another metric")
    return splits


def _choose_executors(pm, params: Mapping[str, Any], declared: Mapping[str, ModelType],
                      metric: str = DEFAULT_METRIC, task: str = REGRESSION) -> dict[str, WatcherExecutor]:
    """The executor registration serving each model type: the manifest's choice, else the only one registered."""
    for model_type in params["model_types"]:
        # the schema's enum lists the declared types; a host that merged params itself may not have checked
        if model_type not in declared:
            raise PluginError(f"{where(params, 'model_types')}: unknown model type {model_type!r}; "
                              f"registered model types: {', '.join(declared) or 'none'}")
        if task not in declared[model_type].tasks:
            raise PluginError(f"{where(params, 'model_types')}: model type {model_type!r} does not learn a {task} "
                              f"task (the data's target {params['data'].get('target', 'y')!r}); it learns "
                              f"{', '.join(declared[model_type].tasks)}")
        if metric not in declared[model_type].metrics:
            raise PluginError(f"{where(params, 'model_types')}: model type {model_type!r} does not report "
                              f"{metric!r}, the metric this run optimises; it reports "
                              f"{', '.join(declared[model_type].metrics)}")
    executors = pm.get_executors()
    serving = pm.executor_for_model_types()
    chosen = params.get("executors") or {}
    out = {}
    for model_type in params["model_types"]:
        name = chosen.get(model_type)
        if name is not None:
            if name not in executors:
                raise PluginError(f"{where(params, f'executors.{model_type}')}: unknown executor {name!r}; "
                                  f"registered executors: {', '.join(executors) or 'none'}")
            if model_type not in executors[name].model_types:
                raise PluginError(f"{where(params, f'executors.{model_type}')}: executor {name!r} does not run "
                                  f"{model_type!r}; "
                                  f"executors for {model_type!r}: {', '.join(serving.get(model_type, [])) or 'none'}")
        else:
            candidates = serving.get(model_type, [])
            if not candidates:
                raise PluginError(f"no registered executor runs model type {model_type!r}; "
                                  f"registered executors: {', '.join(executors) or 'none'}")
            if len(candidates) > 1:
                raise PluginError(f"several executors run {model_type!r} ({', '.join(candidates)}): choose one with "
                                  f"params.executors.{model_type}")
            name = candidates[0]
        out[model_type] = executors[name]
    return out


def _trial_value(results: list[FoldResult]) -> tuple[float | None, str | None]:
    """The mean fold score, or the reason the trial failed."""
    bad = [r for r in results if r.status != STATUS_OK or r.score is None]
    if bad:
        first = min(bad, key=lambda r: r.fold_idx)
        return None, f"fold {first.fold_idx}: {first.status}: {first.error or 'no score'}"
    return sum(cast(float, r.score) for r in results) / len(results), None  # all ok: each has its score


class StudyRunner:
    """Asks, runs and tells the studies that share one executor, batch by batch."""

    def __init__(self, studies: dict[str, optuna.Study], model_types: Mapping[str, ModelType], params: dict,
                 data: DataRef, store: StudyStore, log: TrialLog, board: ProgressBoard, metric: str = DEFAULT_METRIC):
        self.studies = studies
        self.model_types = model_types
        self.params = params
        self.data = data
        self.store = store
        self.log = log
        self.board = board
        self.metric = metric

    def _ask_batch(self, model_type: str, into: list) -> None:
        """Ask up to ask_batch_size trials into ``into``, each recorded as soon as it exists (so that an
        interrupt between asking and suggesting still finds it)."""
        study = self.studies[model_type]
        self.store.fail_stale(study)  # an agent sharing this study may have died since the last batch
        remaining = self.params["trials"] - self.store.trials_counted(study)
        for _ in range(max(0, min(self.params["ask_batch_size"], remaining))):
            with interrupts_held():  # the trial exists once asked: it must be in ``into`` before Ctrl-C acts
                trial = self.store.ask(study)
                into.append((trial, None))
            if self.store.prune_if_surplus(study, trial, self.params["trials"]):
                into.pop()
                break
            job = TrialJob(model_type=model_type, trial_number=trial.number, params=self.model_types[model_type].search_space(trial),
                           data=self.data, folds=self.params["folds"], seed=self.params["seed"], metric=self.metric)
            into[-1] = (trial, job)

    def _record(self, by_trial: dict, result: FoldResult) -> None:
        self.log.write(result, self.studies[result.model_type].study_name)
        by_trial[(result.model_type, result.trial_number)].append(result)
        self.board.fold_done(result.model_type)

    def run(self, executor: Executor) -> None:
        while True:
            asked: dict[str, list] = {mt: [] for mt in self.studies}
            try:
                for model_type in self.studies:
                    self._ask_batch(model_type, asked[model_type])
                asked = {mt: batch for mt, batch in asked.items() if batch}
                if not asked:
                    return
                self._run_and_tell(executor, asked)
            except BaseException:
                # Nothing is left RUNNING: unfinished trials end FAIL and their params are asked again.
                self._fail_unfinished(asked)
                raise

    def _fail_unfinished(self, asked: dict[str, list]) -> None:
        unfinished = [(model_type, trial) for model_type, batch in asked.items() for trial, _ in batch]
        for i, (model_type, trial) in enumerate(unfinished):
            try:
                self.store.fail_and_requeue(self.studies[model_type], trial, "the run stopped before this trial finished")
            except StorageLost as exc:
                # Each try waits out the storage's retries: once it is lost, trying the others only delays
                # the stop (minutes for a batch), and the stale check recovers them all the same.
                logger.warning("%d trials left RUNNING (%s); the next run's stale check re-asks them",
                               len(unfinished) - i, exc)
                return
            except Exception as exc:  # the stale check recovers it later
                logger.warning("trial %d of %s left RUNNING (%s); the next run's stale check re-asks it",
                               trial.number, model_type, exc)

    def _run_and_tell(self, executor: Executor, asked: dict[str, list]) -> None:
        jobs = [job for batch in asked.values() for _, job in batch]
        by_trial: dict[tuple[str, int], list[FoldResult]] = defaultdict(list)
        on_result = functools.partial(self._record, by_trial)
        trials = [trial for batch in asked.values() for trial, _ in batch]
        told: set[tuple[str, int]] = set()
        model_types = list(asked)
        self.board.batch_started(model_types, {mt: len(batch) for mt, batch in asked.items()})
        executor.progress_callback = functools.partial(self.board.batch_progress, model_types,
                                                       folds_in_batch=sum(job.folds for job in jobs))
        try:
            with self.store.heartbeat(trials, self.params["heartbeat_interval_s"]):
                try:
                    returned = executor.run_batch(jobs, on_result=on_result)
                finally:
                    executor.progress_callback = None
            self.board.batch_done(model_types)
            # Results the executor returned without calling back still count, once.
            for result in returned:
                key = (result.model_type, result.trial_number)
                if not any(r.fold_idx == result.fold_idx for r in by_trial[key]):
                    on_result(result)
            self._tell_batch(asked, by_trial, told)
        except BaseException:
            # Stopped (Ctrl-C while training or while telling, a lost worker pool): the trials whose every
            # fold finished are results like any other. Tell them; only the rest are failed and asked
            # again (run()).
            try:
                self._tell_batch(asked, by_trial, told, finished_only=True)
            except StorageLost as exc:  # the stop is what the caller reports; the stale check recovers them
                logger.warning("could not record the trials that finished before the stop: %s", exc)
            raise

    def _tell_batch(self, asked: dict[str, list], by_trial: dict, told: set[tuple[str, int]],
                    finished_only: bool = False) -> None:
        """Tell the batch's trials not told yet, in trial-number order. A fold without a result fails its
        trial; with ``finished_only`` (after a stop) such trials are left, and an error telling one
        trial does not keep the others from being told."""
        for model_type, batch in asked.items():
            for trial, job in sorted(batch, key=lambda pair: pair[0].number):
                key = (model_type, trial.number)
                results = sorted(by_trial[key], key=lambda r: r.fold_idx)
                missing = [k for k in range(job.folds) if k not in {r.fold_idx for r in results}] if job else []
                if key in told or job is None or (finished_only and missing):
                    continue
                results += [FoldResult(trial.number, k, model_type, None, 0.0, "fail",
                                       "the executor returned no result for this fold") for k in missing]
                value, reason = _trial_value(results)
                try:
                    recorded = self.store.tell(self.studies[model_type], trial, job.params, value, reason, results)
                except StorageLost:
                    raise
                except Exception as exc:
                    if not finished_only:
                        raise
                    # Another agent may have failed it as stale meanwhile: it is asked again either way.
                    logger.warning("could not record %s trial %d, which finished before the stop: %s",
                                   model_type, trial.number, exc)
                    continue
                told.add(key)
                if not recorded:  # the run goes on: the trial is asked again, here or by another agent
                    logger.warning("%s trial %d finished, but another agent sharing the study had already "
                                   "failed it as stale (no heartbeat within twice the longest "
                                   "heartbeat_interval_s): its result is not recorded, and its params are "
                                   "asked again", model_type, trial.number)
                    continue
                self.board.trial_done(model_type, value)


def run_compare_models(params: dict, pm, out: TextIO | None = None) -> dict:
    """Run step 5 with validated params; write trials.jsonl, summary.json and the study storage; return the summary."""
    out = out or sys.stdout
    if not params.get("compare_models", True):
        print("compare_models: skipped (params.compare_models is false)", file=out)
        return {"skipped": True}
    started = time.monotonic()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our progress bars and leaderboard speak instead
    data = _data_ref(params)
    dataset = load_dataset(data)  # a bad dataset must fail before anything is trained or written
    metric = _metric(params, dataset)
    splits = _check_folds(data.path or dataset.name, dataset, params, metric)  # a file as it was named, as the loader's errors name it
    fingerprint = dataset.sha256() if data.path else None  # the embedded data is fixed by its version
    devices = resolve_devices(params["devices"], where(params, "devices"))
    declared = pm.get_model_types()
    chosen = _choose_executors(pm, params, declared, metric.name, dataset.task)

    outcomes: dict[str, ModelTypeOutcome] = {}
    runnable: dict[str, WatcherExecutor] = {}
    for model_type in params["model_types"]:
        registration = chosen[model_type]
        missing = registration.missing_requirement(model_type)
        if missing:
            outcomes[model_type] = ModelTypeOutcome(model_type, registration.name, "unavailable", reason=missing)
            print(f"compare_models: {model_type} unavailable: {missing}", file=out)
        else:
            runnable[model_type] = registration

    output_dir = Path(params["output_dir"])
    context = RunContext(output_dir=output_dir, devices=devices,
                         lease_dir=Path(params["lease_dir"]) if params.get("lease_dir") else None,
                         lease_timeout_s=params["lease_timeout_s"], trial_retries=params["trial_retries"],
                         data_shape=(dataset.n_rows, dataset.X.shape[1]), folds=params["folds"])
    groups: dict[str, list[str]] = defaultdict(list)
    for model_type, registration in runnable.items():
        groups[registration.name].append(model_type)
    for executor_name, model_types in groups.items():
        # A contradiction (tree_device "gpu" on a run without GPUs) must stop the run before the NN
        # study trains, not after; it is bad input (exit 2), and nothing is written yet.
        registration = runnable[model_types[0]]
        try:
            registration.load().check(params, context)
        except ExecutorError as exc:
            # The check sees the executor's params against the run's devices; name whoever set them.
            keys = [*registration.schema().get("properties", {}), "devices"]
            raise ManifestError([f"{sources(params, keys)} ({executor_name}): {exc}"]) from None
    store, group_studies = _open_storage(params, output_dir, data, fingerprint, metric, groups, runnable,
                                         declared, devices)
    print(f"compare_models: {dataset.name} ({dataset.n_rows} rows x {dataset.X.shape[1]} features), "
          f"{params['folds']}-fold CV, {params['trials']} trials per model type, "
          f"devices: {', '.join(f'GPU {d}' for d in devices) or 'CPU'}", file=out)

    log = TrialLog(output_dir / TRIALS_FILE, metric.name)
    board = ProgressBoard(list(runnable), params["trials"], enabled=params["progress"],
                          metric=metric.display.replace("²", "2"),  # ASCII, for any log file
                          greater_is_better=metric.greater_is_better, folds=params["folds"],
                          heartbeat_s=params.get("progress_interval_s", HEARTBEAT_S))
    names = list(groups.values())
    for i, model_types in enumerate(names[1:], start=1):  # the groups run one after another
        for model_type in model_types:
            board.queue(model_type, f"queued after {', '.join(mt for group in names[:i] for mt in group)}")
    monitor = GpuMonitor(devices)
    run = _RunRecord(outcomes, {}, monitor, dataset, devices, store, started, params, output_dir, out, metric)
    monitor.start()
    try:
        for executor_name, model_types in groups.items():
            group_started = time.monotonic()
            studies = group_studies[executor_name]
            run.studies.update(studies)
            for model_type, study in studies.items():
                board.resume(model_type, store.trials_counted(study), store.best(study)[0], study.study_name)
            trained = None
            try:
                executor_cls = runnable[model_types[0]].load()
                with executor_cls(params, context) as executor:
                    StudyRunner(studies, declared, params, data, store, log, board, metric.name).run(executor)
                    trained = time.monotonic()  # the leaderboard's seconds are the studies', not the refit's
                    if params.get("refit_best", True):  # while the executor's workers are warm
                        best = _best_trials(store, studies, executor_name)
                        if best:
                            models, saved = refit_best(executor, best, dataset, data, params, metric, output_dir,
                                                       functools.partial(board.note, out=out))
                            run.models.update(models)
                            run.saved.update(saved)
            except KeyboardInterrupt:
                try:  # what finished, for the summary; never let this hide the interrupt
                    outcomes.update(_outcomes(store, studies, executor_name, time.monotonic() - group_started))
                except Exception as exc:
                    logger.warning("could not read the %s results for the summary: %s", executor_name, exc)
                raise
            outcomes.update(_outcomes(store, studies, executor_name, (trained or time.monotonic()) - group_started))
        run.oof_path = write_oof(output_dir, dataset, splits, run.saved)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM turned into one by the host
        board.close()
        monitor.stop()
        try:
            run.write(interrupted=True)
        except Exception as exc:  # never let the clean-up hide the interrupt
            logger.warning("could not write the summary of the interrupted run: %s", exc)
        raise
    finally:
        board.close()
        monitor.stop()
        log.close()
    return run.write()


def _open_storage(params: Mapping[str, Any], output_dir: Path, data: DataRef, fingerprint: str | None,
                  metric: Metric, groups: dict[str, list[str]], runnable: dict[str, WatcherExecutor],
                  declared: Mapping[str, ModelType],
                  devices: list[int]) -> tuple[StudyStore, dict[str, dict[str, optuna.Study]]]:
    """Make output_dir, open the storage and every study. Bad input (an output_dir that cannot be written, a
    bad storage URL, a study made with other params) leaves nothing behind: no study is created until
    every one is checked, and what this made of output_dir is removed again."""
    made = _make_output_dir(output_dir, where(params, "output_dir"))
    store = None
    try:
        store = StudyStore.open(params, output_dir, data, fingerprint, metric)
        return store, _open_studies(store, groups, runnable, declared, params, devices)
    except BaseException:
        if store is not None:
            store.close()
        # A SQLite file in an output_dir this run made is this run's too.
        _remove_made(made, [output_dir / DEFAULT_DB] if made and not params.get("storage") else [])
        raise


def _open_studies(store: StudyStore, groups: dict[str, list[str]], runnable: dict[str, WatcherExecutor],
                  declared: Mapping[str, ModelType], params: Mapping[str, Any],
                  devices: list[int]) -> dict[str, dict[str, optuna.Study]]:
    """Every study, opened (and checked against the params it was made with) before anything trains: a
    tree param changed since the last run must not be refused after hours of NN training. All are
    checked before any is created, so that a refused one leaves no other behind."""
    result_params = {}
    for executor_name, model_types in groups.items():
        # GPU and CPU fits of one model differ (algorithms, rounding), so where it ran defines a study too.
        registration = runnable[model_types[0]]
        result_params[executor_name] = ({key: params[key] for key in registration.result_params}
                                        | registration.result_tags | {"compute": "gpu" if devices else "cpu"})
        for model_type in model_types:
            store.check(model_type, result_params[executor_name])
    return {executor_name: {mt: store.study(mt, seed=params["seed"] + declared[mt].seed_offset,
                                            result_params=result_params[executor_name]) for mt in names}
            for executor_name, names in groups.items()}


def _make_output_dir(output_dir: Path, param: str) -> list[Path]:
    """Make output_dir (and its missing parents) and check it can be written; return the directories this
    made, deepest first, so that a run stopped by bad input can remove them again."""
    made: list[Path] = []
    try:  # exists() too can raise (a parent that may not be searched)
        if output_dir.exists() and not output_dir.is_dir():
            raise OutputDirError(f"{param}: {output_dir} exists and is not a directory")
        made = list(itertools.takewhile(lambda path: not path.exists(), [output_dir, *output_dir.parents]))
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        _remove_made(made)
        raise OutputDirError(f"{param}: cannot write to {output_dir}: {exc.strerror or exc}") from None
    return made


def _remove_made(directories: list[Path], files: Sequence[Path] = ()) -> None:
    """Remove ``files``, then ``directories`` (deepest first) while they are empty: what a run made before it
    stopped on bad input, and nothing anyone else put there meanwhile."""
    for path in files:
        path.unlink(missing_ok=True)
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:  # not empty, or gone: leave it and the directories above it
            return


def _best_trials(store: StudyStore, studies: dict[str, optuna.Study], executor_name: str) -> list[BestTrial]:
    """Each study's best trial, with its fold scores and infos; studies without a complete trial are left out."""
    best = []
    for model_type, study in studies.items():
        _, number, job_params = store.best(study)
        if number is not None:
            fold_scores, fold_info = store.fold_records(study, number)
            best.append(BestTrial(model_type, executor_name, number, job_params, fold_scores, fold_info))
    return best


def _outcomes(store: StudyStore, studies: dict[str, optuna.Study], executor_name: str,
              elapsed: float) -> dict[str, ModelTypeOutcome]:
    outcomes = {}
    for model_type, study in studies.items():
        best_score, best_trial, best_params = store.best(study)
        complete, failed, running = store.trial_counts(study)
        reasons = store.failure_reasons(study)
        reason = max(set(reasons), key=reasons.count) if reasons else None
        outcomes[model_type] = ModelTypeOutcome(model_type, executor_name, "done", best_score, best_trial,
                                                best_params, complete, failed, round(elapsed, 2), reason,
                                                trials_running=running,
                                                best_fold_scores=store.fold_records(study, best_trial)[0]
                                                if best_trial is not None else [],
                                                study_seconds=round(store.add_run_seconds(study, elapsed), 2))
    return outcomes


@dataclass
class _RunRecord:
    """What the end of a run (or of an interrupted one) writes: summary.json, the report, the leaderboard."""

    outcomes: dict[str, ModelTypeOutcome]
    studies: dict[str, optuna.Study]
    monitor: GpuMonitor
    dataset: Any
    devices: list[int]
    store: StudyStore
    started: float
    params: dict
    output_dir: Path
    out: TextIO
    metric: Metric
    models: dict[str, RefitOutcome] = field(default_factory=dict)  # refit_best's saved models
    saved: dict[str, RefitResult] = field(default_factory=dict)
    oof_path: Path | None = None

    def write(self, interrupted: bool = False) -> dict:
        outcomes = self.outcomes.values()
        sign = -1.0 if self.metric.greater_is_better else 1.0  # best first
        summary = {
            "leaderboard": [asdict(o) for o in sorted(
                (o for o in outcomes if o.status == "done"),
                key=lambda o: (o.best_score is None, sign * (o.best_score or 0.0)))],
            "unavailable": {o.model_type: o.reason for o in outcomes if o.status == "unavailable"},
            # Model types an interrupt stopped before their group started (none when the run completed).
            "not_run": [mt for mt in self.params["model_types"] if mt not in self.outcomes and mt not in self.studies],
            "dataset": {"name": self.dataset.name, "rows": self.dataset.n_rows,
                        "features": int(self.dataset.X.shape[1]), "target": self.dataset.target,
                        "task": self.dataset.task, "classes": list(self.dataset.classes)},
            "metric": self.metric.name,  # tasks.METRICS: its direction, how it is spelled
            "devices": self.devices,
            "storage": self.store.url_for_display,
            "seconds": round(time.monotonic() - self.started, 2),
            # As given, but for the storage URL's password: summary.json and the report get mailed around.
            "params": {**self.params, "storage": self.store.url_for_display} if self.params.get("storage")
            else self.params,
            "interrupted": interrupted,
            "models": {model_type: asdict(outcome) for model_type, outcome in self.models.items()},
            "oof_predictions": str(self.oof_path) if self.oof_path else None,
        }
        (self.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if self.monitor.samples:
            (self.output_dir / GPU_SAMPLES_FILE).write_text(json.dumps(self.monitor.to_json()) + "\n",
                                                            encoding="utf-8")
        report = write_report(self.output_dir, self.studies, summary, self.monitor.samples or None)
        print(format_leaderboard(summary), file=self.out)
        print(f"\nreport: {report}", file=self.out)
        return summary


def format_leaderboard(summary: dict) -> str:
    """The leaderboard as a plain-text table: model type, best mean score, trials, seconds (this run's,
    and the study's over every run that trained it), its params."""
    metric = METRICS[summary.get("metric") or DEFAULT_METRIC].display
    rows = [("model", f"best {metric}", "trials", "failed", "seconds", "study s", "best params")]
    for row in summary["leaderboard"]:
        r2 = "-" if row["best_score"] is None else f"{row['best_score']:.4f}"
        params = params_text(row["best_params"], separators=(",", ":"))
        rows.append((row["model_type"], r2, str(row["trials_complete"]), str(row["trials_failed"]),
                     f"{row['seconds']:.1f}", f"{row.get('study_seconds', row['seconds']):.1f}", params))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["", "compare_models leaderboard"]
    for r in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(r[:6], widths)) + "  " + r[6])
    for row in summary["leaderboard"]:
        if row["trials_failed"]:
            lines.append(f"{row['model_type']}: {row['trials_failed']} trial(s) failed, most often: {row['reason']}")
    for row in summary["leaderboard"]:
        if row.get("trials_running"):  # this agent is done; others sharing the study are not
            lines.append(f"{row['model_type']}: {row['trials_running']} trial(s) still running in other agents "
                         f"sharing the study: this is the study as this agent ended")
    for model_type, reason in summary["unavailable"].items():
        lines.append(f"{model_type}: unavailable: {reason}")
    for model_type, model in (summary.get("models") or {}).items():
        if model["status"] == "saved":
            lines.append(f"{model_type}: best trial {model['trial_number']} refit on every row, saved in "
                         f"{model['path']} (watcher-agent predict --model {model['path']} --data FILE)")
        else:
            lines.append(f"{model_type}: best trial not saved: {model['error']}")
    if summary.get("interrupted"):
        lines.append("interrupted: these are the trials that finished before the run stopped"
                     + (f"; not run: {', '.join(summary['not_run'])}" if summary.get("not_run") else ""))
    return "\n".join(lines)
