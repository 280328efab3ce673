"""The Optuna storage of compare_models: one study per model type, created or resumed.

A study remembers what defines it (data, folds, seed, ask batch size); resuming it with different
values is an error, since the continued trajectory would no longer be the one the manifest asks for.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.trial import TrialState

from watcher_plugins.errors import StorageError
from watcher_plugins.records import DataRef, FoldResult

DEFAULT_DB = "optuna.db"
_REQUEUED = "requeued"
_DEFINING_PARAMS = ("folds", "seed", "ask_batch_size")


class StudyStore:
    """Creates, resumes and updates the studies of one compare_models run."""

    def __init__(self, storage: optuna.storages.BaseStorage, url: str, prefix: str, definition: dict):
        self.storage = storage
        self.url = url
        self.prefix = prefix
        self.definition = definition

    @classmethod
    def open(cls, params: dict, output_dir: Path, data: DataRef) -> StudyStore:
        url = params.get("storage") or f"sqlite:///{(output_dir / DEFAULT_DB).resolve()}"
        try:
            storage = optuna.storages.RDBStorage(url)
        except Exception as exc:  # sqlalchemy and driver errors have no common public base here
            raise StorageError(f"params::$.storage: cannot open Optuna storage {_redact(url)}: "
                               f"{type(exc).__name__}: {exc}") from None
        definition = {key: params[key] for key in _DEFINING_PARAMS} | {"data": data.to_json()}
        return cls(storage, url, params["study_name"], definition)

    @property
    def url_for_display(self) -> str:
        return _redact(self.url)

    def study(self, model_type: str, seed: int) -> optuna.Study:
        """The study of one model type: created, or resumed after checking it is the same study."""
        name = f"{self.prefix}-{model_type}"
        sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        study = optuna.create_study(storage=self.storage, study_name=name, sampler=sampler,
                                    direction="maximize", load_if_exists=True)
        stored = study.user_attrs.get("definition")
        if stored is None:
            study.set_user_attr("model_type", model_type)
            study.set_user_attr("definition", self.definition)
        elif stored != json.loads(json.dumps(self.definition)):
            diffs = [f"{key}: stored {stored.get(key)!r}, now {self.definition.get(key)!r}"
                     for key in sorted(set(stored) | set(self.definition)) if stored.get(key) != self.definition.get(key)]
            raise StorageError(f"study {name!r} in {self.url_for_display} was made with other params ({'; '.join(diffs)}); "
                               "resume it with the same params, or choose another study_name or output_dir")
        return study

    def trials_counted(self, study: optuna.Study) -> int:
        """Trials that count toward ``trials``: finished ones (except those re-queued) and ones running now."""
        count = 0
        for trial in study.get_trials(deepcopy=False):
            if trial.state in (TrialState.COMPLETE, TrialState.RUNNING):
                count += 1
            elif trial.state == TrialState.FAIL and not trial.user_attrs.get(_REQUEUED):
                count += 1
        return count

    def finished_counts(self, study: optuna.Study) -> tuple[int, int]:
        trials = study.get_trials(deepcopy=False)
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        failed = sum(t.state == TrialState.FAIL and not t.user_attrs.get(_REQUEUED) for t in trials)
        return complete, failed

    def best(self, study: optuna.Study) -> tuple[float | None, int | None, dict]:
        """Best mean R^2, its trial number and the params its job ran with."""
        complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if not complete:
            return None, None, {}
        best = max(complete, key=lambda t: (t.value, -t.number))
        return best.value, best.number, best.user_attrs.get("job_params", best.params)

    def tell(self, study: optuna.Study, trial: optuna.Trial, job_params: dict, value: float | None,
             reason: str | None, results: list[FoldResult]) -> None:
        trial.set_user_attr("job_params", job_params)
        trial.set_user_attr("fold_r2", [r.r2 for r in results])
        if value is None:
            trial.set_user_attr("fail_reason", reason)
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, value)

    def fail_and_requeue(self, study: optuna.Study, trial_number: int, reason: str) -> None:
        """End a trial that did not finish as FAIL, and enqueue its params so the next ask runs it again."""
        frozen = study.get_trials(deepcopy=False)[trial_number]
        if frozen.state != TrialState.RUNNING:
            return
        self.storage.set_trial_user_attr(frozen._trial_id, "fail_reason", reason)
        self.storage.set_trial_user_attr(frozen._trial_id, _REQUEUED, True)
        study.tell(trial_number, state=TrialState.FAIL)
        study.enqueue_trial(frozen.params, skip_if_exists=False)


def _redact(url: str) -> str:
    """A storage URL without its password, for messages and summaries."""
    if "://" in url and "@" in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
