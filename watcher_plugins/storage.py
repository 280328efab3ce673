"""The Optuna storage of compare_models: one study per model type, created, resumed or shared.

- A study remembers what defines it (data, folds, seed, ask batch size, the executor's result params,
  GPU or CPU); resuming it with other values is an error, since the continued trajectory would no longer
  be the one the manifest asks for. A data file is named by the SHA-256 of the numbers read from it, not
  by its path. check() reads a study's definition without creating anything, so that a run can check
  every study before it creates one.
- Running trials send heartbeats. A trial whose agent died (killed, host lost) goes silent; the next
  agent to look marks it FAIL and enqueues its params again, tagged ``retry_of``. A failed trial that
  was retried does not count toward ``trials``.
- Each trial's params are sampled by a sampler seeded from the study seed and the trial number, so a
  single agent's trajectory is reproducible and two agents sharing a study never draw the same params
  from the same random stream.
- A storage operation whose connection fails is retried a few times; then the run stops with
  StorageLost. A trial's tell (its user attrs, then its state) is retried as a whole; a trial whose
  tell could not finish stays RUNNING, goes stale, and is asked again by the next run.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar, cast

import optuna
from optuna.trial import FrozenTrial, TrialState

from watcher_plugins.data import EMBEDDED_DEFAULT_ROWS
from watcher_plugins.errors import StorageError, StorageLost
from watcher_plugins.manifest import where
from watcher_plugins.records import DataRef, FoldResult
from watcher_plugins.tasks import METRICS, Metric

DEFAULT_DB = "optuna.db"
RETRY_OF = "retry_of"
#: A trial's user attr: its agent's heartbeat interval, by which any agent judges the trial stale.
HEARTBEAT_INTERVAL = "heartbeat_interval_s"
_DEFINING_PARAMS = ("folds", "seed", "ask_batch_size")
T = TypeVar("T")


def _is_connection_error(exc: BaseException | None) -> bool:
    """A lost or refused database connection, also when optuna wrapped it (StorageInternalError from ...)."""
    import sqlalchemy.exc

    while exc is not None:
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or (
                isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class StudyStore:
    """Creates, resumes and updates the studies of one compare_models run."""

    def __init__(self, storage: optuna.storages.RDBStorage, url: str, prefix: str, definition: dict, data: DataRef,
                 retries: int = 3, retry_wait_s: float = 1.0, in_output_dir: bool = True,
                 metric: Metric = METRICS["r2"]):
        self.storage = storage
        self.url = url
        self.prefix = prefix
        self.definition = definition
        self.data = data
        self.retries = retries
        self.retry_wait_s = retry_wait_s
        self.in_output_dir = in_output_dir  # the default SQLite file: another output_dir is another storage
        self.metric = metric

    @classmethod
    def open(cls, params: Mapping, output_dir: Path, data: DataRef, data_sha256: str | None = None,
             metric: Metric = METRICS["r2"]) -> StudyStore:
        """Connect (and create the schema if needed); a bad URL or a database that is down fails here.
        ``data_sha256``: a data file's fingerprint (Dataset.sha256), by which the definition names it."""
        url = params.get("storage") or f"sqlite:///{(output_dir / DEFAULT_DB).resolve()}"
        # Named as the params name it: the storage URL, or the output_dir its default SQLite file is in.
        param = where(params, "storage" if params.get("storage") else "output_dir")
        try:
            storage = _connect(url, params["heartbeat_interval_s"])
        except ImportError:
            raise StorageError(f"{param}: no database driver for {_redact(url)}; for PostgreSQL: "
                               "pip install 'watcher_plugins[postgres]' and use postgresql+psycopg://...") from None
        except Exception as exc:  # sqlalchemy's ArgumentError, OperationalError, ... share no narrower base
            raise StorageError(f"{param}: cannot open Optuna storage {_redact(url)}: "
                               f"{type(exc).__name__}: {_first_line(exc)}") from None
        definition = {key: params[key] for key in _DEFINING_PARAMS} | {"data": data_identity(data, data_sha256)}
        if metric.name != "r2":  # studies made before metrics existed optimised R², and say nothing
            definition["metric"] = metric.name
        return cls(storage, url, params["study_name"], definition, data, retries=params["storage_retries"],
                   in_output_dir=not params.get("storage"), metric=metric)

    def close(self) -> None:
        """Close the database connections (before a SQLite file this run made is removed)."""
        self.storage.remove_session()
        self.storage.engine.dispose()

    @property
    def url_for_display(self) -> str:
        return _redact(self.url)

    def retrying(self, what: str, operation: Callable[[], T]) -> T:
        """Run a storage operation, retrying it while the database connection fails."""
        for attempt in range(self.retries + 1):
            try:
                return operation()
            except Exception as exc:
                if not _is_connection_error(exc):
                    raise
                if attempt == self.retries:
                    raise StorageLost(f"lost the connection to {self.url_for_display} while {what} "
                                       f"({self.retries} retries): {_first_line(exc)}; completed trials are "
                                       "saved, and a re-run resumes the study") from None
                time.sleep(self.retry_wait_s * 2**attempt)
        raise AssertionError("unreachable")

    def _definition(self, result_params: dict | None) -> dict:
        """A study's definition in this run. ``result_params`` are the executor's params that change a
        trial's R^2 (epochs, rounds, precision, device); they join it."""
        return json.loads(json.dumps(self.definition | (result_params or {})))

    def check(self, model_type: str, result_params: dict | None = None) -> None:
        """StorageError if the storage holds a study of ``model_type`` made with another definition. Reads
        only, so that a run can check every study before it creates any."""
        name = f"{self.prefix}-{model_type}"
        try:
            study_id = self.retrying(f"looking up study {name!r}", lambda: self.storage.get_study_id_from_name(name))
        except KeyError:
            return  # a new study
        stored = self.retrying(f"reading study {name!r}", lambda: self.storage.get_study_user_attrs(study_id))
        self._refuse_other(name, study_id, stored.get("definition"), self._definition(result_params))

    def study(self, model_type: str, seed: int, result_params: dict | None = None) -> optuna.Study:
        """The study of one model type: created, or resumed after checking it is the same study."""
        name = f"{self.prefix}-{model_type}"
        definition = self._definition(result_params)

        def load() -> optuna.Study:
            return optuna.create_study(storage=self.storage, study_name=name, direction=self.metric.direction,
                                       sampler=per_trial_sampler(seed, 0), load_if_exists=True)

        study = self.retrying(f"opening study {name!r}", load)
        stored = study.user_attrs.get("definition")
        if stored != definition:
            # Checked here, not only by check(): another agent may have trained in it since. Before any
            # write: a refused study is left as it was.
            self._refuse_other(name, study._study_id, stored, definition)
            # New, untrained, or stored in an earlier release's form: from now on in this one's.
            study.set_user_attr("model_type", model_type)
            study.set_user_attr("definition", definition)
        study.set_user_attr("sampler_seed", seed)
        self.fail_stale(study)
        return study

    def _refuse_other(self, name: str, study_id: int, stored: dict | None, definition: dict) -> None:
        """StorageError if the study was made with another definition and trained in. A study nothing was
        trained in (a run that stopped before its first trial) has nothing to protect: it is this run's."""
        stored = _in_current_form(stored, definition, self.data)
        if stored is None or stored == definition:
            return
        if self.retrying("reading trials", lambda: self.storage.get_n_trials(study_id)):
            raise StorageError(self._refusal(name, stored, definition))

    def _refusal(self, name: str, stored: dict, definition: dict) -> str:
        way_out = "choose another study_name or output_dir" if self.in_output_dir else "choose another study_name"
        diffs = [key for key in sorted(set(stored) | set(definition)) if stored.get(key) != definition.get(key)]
        then, now = stored.get("data"), definition["data"]
        if diffs == ["data"] and isinstance(then, dict) and "sha256" in then and "sha256" in now \
                and then.get("target") == now.get("target"):
            return (f"study {name!r} in {self.url_for_display} was made with other data: the numbers read from "
                    f"{self.data.path} differ from those it was made with (SHA-256 {then['sha256'][:12]}... then, "
                    f"{now['sha256'][:12]}... now); restore that data, or {way_out}")
        shown = "; ".join(f"{key}: stored {stored.get(key)!r}, now {definition.get(key)!r}" for key in diffs)
        return (f"study {name!r} in {self.url_for_display} was made with other params ({shown}); resume it with "
                f"the same params, or {way_out}")

    def fail_stale(self, study: optuna.Study) -> None:
        """Mark trials whose agent stopped sending heartbeats FAIL, and enqueue their params again.

        Silence is judged by the longest heartbeat interval among the running trials' agents (each trial
        records its agent's), not by this agent's alone: agents sharing a study may beat at different
        intervals, and one beating every 20 s must not be taken for dead by one beating every second."""
        def fail_stale() -> None:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            longest = max([self.storage.heartbeat_interval,
                           *(t.user_attrs.get(HEARTBEAT_INTERVAL, 0) for t in running)])
            self.storage.grace_period = 2 * longest
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)

        self.retrying("checking for stale trials", fail_stale)

    def ask(self, study: optuna.Study) -> optuna.Trial:
        """Ask one trial; its params will be drawn from a stream seeded by the study seed and its number."""
        with warnings.catch_warnings():
            # We send the heartbeats ourselves (TrialHeartbeat), not through Study.optimize.
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            trial = self.retrying("asking a trial", study.ask)
        self.retrying("recording a heartbeat", lambda: self.storage.record_heartbeat(trial._trial_id))
        self.retrying("recording the heartbeat interval",
                      lambda: trial.set_user_attr(HEARTBEAT_INTERVAL, self.storage.heartbeat_interval))
        # The sampler draws at suggest time: reseeding it here makes trial n's params a function of
        # (seed, n, history), the same in every run, and different between agents sharing the study.
        study.sampler = per_trial_sampler(study.user_attrs["sampler_seed"], trial.number)
        return trial

    def _counted_trials(self, study: optuna.Study) -> list[FrozenTrial]:
        return _counted(self.retrying("reading trials", lambda: study.get_trials(deepcopy=False)))

    def trials_counted(self, study: optuna.Study) -> int:
        """Trials that count toward ``trials``: complete, running, and failed ones that were not retried."""
        return len(self._counted_trials(study))

    def prune_if_surplus(self, study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
        """End ``trial`` as PRUNED if ``target`` counted trials precede it (another agent sharing the study
        asked at the same time as this one); PRUNED trials do not count. True if it was pruned."""
        if sum(t.number < trial.number for t in self._counted_trials(study)) < target:
            return False
        trial.set_user_attr("pruned_reason", "surplus: the study already had its trials")
        self.retrying(f"pruning surplus trial {trial.number}", lambda: study.tell(trial, state=TrialState.PRUNED))
        return True

    def trial_counts(self, study: optuna.Study) -> tuple[int, int, int]:
        """(complete, failed, running) trials, not counting failed trials that were retried. Once this
        agent's trials are all told, running ones belong to other agents sharing the study."""
        counted = self._counted_trials(study)
        complete, failed, running = (sum(t.state == state for t in counted)
                                     for state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING))
        return complete, failed, running

    def add_run_seconds(self, study: optuna.Study, seconds: float) -> float:
        """Add a run's seconds on the study to what its runs spent before; return the total (runs of
        several agents sharing a study each add their own)."""
        total = float(study.user_attrs.get("run_seconds", 0.0)) + seconds
        self.retrying("recording the run's seconds", lambda: study.set_user_attr("run_seconds", round(total, 2)))
        return total

    def failure_reasons(self, study: optuna.Study) -> list[str]:
        """The fail reasons of the counted FAIL trials, in trial order."""
        return [t.user_attrs.get("fail_reason") or "no reason recorded" for t in self._counted_trials(study)
                if t.state == TrialState.FAIL]

    def best(self, study: optuna.Study) -> tuple[float | None, int | None, dict]:
        """The best mean score (by the metric's direction), its trial number and the params its job ran with."""
        complete = self.retrying("reading trials",
                                 lambda: study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if not complete:
            return None, None, {}
        sign = 1.0 if self.metric.greater_is_better else -1.0
        best = max(complete, key=lambda t: (sign * cast(float, t.value), -t.number))  # ties: the earliest trial
        return best.value, best.number, best.user_attrs.get("job_params", best.params)

    def fold_records(self, study: optuna.Study, number: int) -> tuple[list[float | None], list[dict]]:
        """A told trial's fold scores and fold infos (empty lists for a trial told by an older release)."""
        trial = self.retrying(f"reading trial {number}", lambda: study.get_trials(deepcopy=False)[number])
        return list(trial.user_attrs.get("fold_scores", [])), list(trial.user_attrs.get("fold_info", []))

    def tell(self, study: optuna.Study, trial: optuna.Trial, job_params: dict, value: float | None,
             reason: str | None, results: list[FoldResult]) -> bool:
        """Record a finished trial; False if it had been ended already by another agent, which took it for
        stale (its heartbeats stopped for longer than that agent allows): its params are asked again."""
        def tell() -> None:
            trial.set_user_attr("job_params", job_params)
            trial.set_user_attr("fold_scores", [r.score for r in results])
            trial.set_user_attr("fold_info", [r.info for r in results])  # what a refit of the trial starts from
            if value is None:
                trial.set_user_attr("fail_reason", reason)
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, value)

        try:
            self.retrying(f"telling trial {trial.number}", tell)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        return True

    def fail_and_requeue(self, study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
        """End a trial that did not finish as FAIL, and enqueue its params so the next ask runs it again."""
        def fail_and_requeue() -> None:
            frozen = study.get_trials(deepcopy=False)[trial.number]
            if frozen.state != TrialState.RUNNING:
                return  # told already, or failed as stale by another agent
            trial.set_user_attr("fail_reason", reason)
            study.tell(trial, state=TrialState.FAIL)
            _requeue(study, frozen)

        self.retrying(f"marking trial {trial.number} FAIL", fail_and_requeue)

    def heartbeat(self, trials: Iterable[optuna.Trial], interval_s: float) -> TrialHeartbeat:
        return TrialHeartbeat(self.storage, [t._trial_id for t in trials], interval_s)


def _connect(url: str, heartbeat_interval_s: int, attempts: int = 4) -> optuna.storages.RDBStorage:
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
                    heartbeat_interval=heartbeat_interval_s, heartbeat_stale_trial_callback=_requeue_stale_trial,
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Agents starting together on a new database race to create optuna's tables (PostgreSQL says
            # "duplicate key" or "relation already exists"); the loser retries and finds them made.
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


class TrialHeartbeat:
    """Records a heartbeat for each running trial of a batch, every interval, until stopped."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_ids: list[int], interval_s: float):
        self._storage = storage
        self._trial_ids = trial_ids
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="trial-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            for trial_id in self._trial_ids:
                try:
                    self._storage.record_heartbeat(trial_id)
                except Exception:  # a missed beat is harmless; a dead database is reported by the main thread
                    pass

    def __enter__(self) -> TrialHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def _counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count toward ``trials``: complete, running, and failed ones that were not retried."""
    retried = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING)
            or (t.state == TrialState.FAIL and t.number not in retried)]


def per_trial_sampler(seed: int, trial_number: int) -> optuna.samplers.BaseSampler:
    """TPE seeded by (seed, trial number); constant liar keeps a batch's trials apart."""
    return optuna.samplers.TPESampler(seed=(seed * 7_919 + trial_number) % (2**31 - 1), constant_liar=True)


def _requeue(study: optuna.Study, failed: FrozenTrial) -> None:
    study.enqueue_trial(failed.params, user_attrs={RETRY_OF: failed.number}, skip_if_exists=False)


def _requeue_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Called by optuna for each trial it finds stale: run the same params again."""
    _requeue(study, trial)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _redact(url: str) -> str:
    """A storage URL without its password, for messages and summaries."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def data_identity(data: DataRef, sha256: str | None) -> dict:
    """The data as a study's definition names it: the embedded data by its row count; a file by the SHA-256
    of the numbers read from it (Dataset.sha256) and its target column, not by its path, so that the same
    file named from another directory, or copied elsewhere, is the same data, and a file changed in place
    is not."""
    if data.embedded:
        return {"embedded": data.embedded, "rows": data.rows or EMBEDDED_DEFAULT_ROWS}
    if not sha256:
        raise ValueError(f"the SHA-256 of data file {data.path} is needed to name it in a study's definition")
    return {"sha256": sha256} | ({"target": data.target} if data.target else {})


def _in_current_form(stored: dict | None, current: dict, data: DataRef) -> dict | None:
    """A definition stored by an earlier release, in the form this one writes, so that its studies resume:
    embedded data without its row count had the default; a data file was named by its path with its
    SHA-256 beside it (compared by the SHA-256 now) or, before files were fingerprinted, by its path alone
    (the same path as this run's is taken as this run's data, as those releases took it)."""
    if not isinstance(stored, dict) or not isinstance(stored.get("data"), dict):
        return stored
    stored = dict(stored)
    old = stored["data"]
    if old.get("embedded") and old.get("rows") is None:
        stored["data"] = {**old, "rows": EMBEDDED_DEFAULT_ROWS}
    elif "path" in old:
        sha256 = stored.pop("data_sha256", None)
        if sha256:
            stored["data"] = {"sha256": sha256} | ({"target": old["target"]} if old.get("target") else {})
        elif old == data.to_json():
            stored["data"] = current["data"]
    return stored
