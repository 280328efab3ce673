"""Registration dataclasses: what a plugin yields from its hooks."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watcher_plugins.errors import PluginError
from watcher_plugins.schema_files import shipped_path

if TYPE_CHECKING:
    import optuna

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def schema_from_resource(ref: str | dict | None) -> dict:
    """Load a params schema given inline or as ``package:file.json`` shipped as package data."""
    if ref is None:
        return {"type": "object", "properties": {}}
    if isinstance(ref, dict):
        return ref
    package, colon, filename = ref.partition(":")
    if not colon or not package or not filename:
        raise PluginError(f"params_schema {ref!r}: expected an inline schema or 'package:file.json'")
    try:
        return json.loads(shipped_path(package, filename).read_text(encoding="utf-8"))
    except (ImportError, OSError, ValueError) as exc:  # no such package or file; not JSON
        raise PluginError(f"params_schema {ref!r}: cannot load the schema: {exc}") from None


@dataclass
class WatcherPlugin:
    """Base of every registration: a lower-case identifier name."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name.strip().lower()):
            raise PluginError(
                f"{type(self).__name__} name {self.name!r} is invalid: expected lower-case letters, digits and '_'"
            )
        self.name = self.name.strip().lower()


#: The metric every model type's study optimises today (mean held-out R² over the folds, maximised).
DEFAULT_METRIC = "r2"


def _no_load() -> Any:
    """The default ``load`` of a registration that names none: loads nothing."""
    return None


@dataclass(frozen=True)
class ModelType:
    """A model type, declared by the executor registration that owns it: everything step 5 needs to run
    its study, so that adding one is a registration and no change to the core.

    :param search_space: ``(optuna.Trial) -> params``, the params a trial job carries to its worker.
    :param seed_offset: added to the run's seed for this type's sampler, so that a study's trajectory
        does not depend on which other model types are in the run; unique among registered types.
    :param metrics: the objectives its trials can report, the study's metric among them.
    :param tasks: the tasks (tasks.TASKS) it can learn.
    :param predict: ``(model_dir, X) -> predictions``: a model its executor saved (Executor.refit), applied
        to rows encoded as the dataset's (data.FeatureSchema: float64, NaN where missing, category codes);
        predictions shaped as tasks.py says. Imports what it needs itself (torch, a tree library). None: its
        models cannot be saved.
    """

    name: str
    search_space: Callable[[optuna.Trial], dict] = field(repr=False)
    seed_offset: int
    metrics: tuple[str, ...] = (DEFAULT_METRIC,)
    tasks: tuple[str, ...] = ("regression",)
    predict: Callable[[Path, Any], Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise PluginError(f"model type name {self.name!r} is invalid: expected lower-case letters, digits and '_'")
        if not isinstance(self.seed_offset, int) or isinstance(self.seed_offset, bool) or self.seed_offset < 0:
            raise PluginError(f"model type {self.name!r}: seed_offset {self.seed_offset!r}: expected an int >= 0")
        if not callable(self.search_space):
            raise PluginError(f"model type {self.name!r}: search_space must be callable (optuna.Trial -> dict)")


@dataclass
class WatcherExecutor(WatcherPlugin):
    """An executor: runs batches of trials of the given model types.

    :param model_types: the model types it runs: a ``ModelType`` declares one (this registration owns
        it), a name runs one that another registration declares. ``model_types`` holds the names
        afterwards, ``declares`` the declarations.
    :param load: returns the Executor class; called only when the executor is used, so that heavy
        imports (torch, a tree library) stay out of the host process until needed.
    :param params_schema: the JSON Schema of the manifest params this executor owns, inline or as
        ``package:file.json``; its properties join the manifest's params schema.
    :param requires: for each model type, a module that must be importable for it to run.
    """

    model_types: tuple[str | ModelType, ...] = ()
    load: Callable[[], type[Any]] = field(default=_no_load, repr=False)
    params_schema: str | dict | None = None
    description: str = ""
    #: model type -> the module it needs (checked without importing it), and the command that installs it
    requires: dict[str, str] = field(default_factory=dict)
    install_hint: str = ""
    #: the executor's params that change a trial's result; they are part of a study's definition, so a
    #: study cannot be resumed with other values (params that only change speed are left out)
    result_params: tuple[str, ...] = ()
    #: what else defines the executor's results, as constants: bump one when a release changes how trials
    #: are computed, so that a study made before is refused rather than mixed with the new results
    result_tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        given = tuple(self.model_types)
        if not given:
            raise PluginError(f"executor {self.name!r} registers no model_types")
        self.declares: tuple[ModelType, ...] = tuple(m for m in given if isinstance(m, ModelType))
        self.model_types = tuple(m.name if isinstance(m, ModelType) else m for m in given)
        for name in self.model_types:
            if not isinstance(name, str) or not _NAME.match(name):
                raise PluginError(f"executor {self.name!r}: model type {name!r}: expected a ModelType or its name")

    def schema(self) -> dict:
        return schema_from_resource(self.params_schema)

    def missing_requirement(self, model_type: str) -> str | None:
        """Why ``model_type`` cannot run here (with the install command), or None if it can."""
        module = self.requires.get(model_type)
        if module is None or importlib.util.find_spec(module) is not None:
            return None
        return f"{module} is not installed; install it with: {self.install_hint or f'pip install {module}'}"


@dataclass
class WatcherPipelineStep(WatcherPlugin):
    """A numbered pipeline step. ``load()`` returns ``run(params: dict, context) -> Any``."""

    number: int = 0
    load: Callable[[], Callable[..., Any]] = field(default=_no_load, repr=False)
    params_schema: str | dict | None = None
    description: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.number, int) or self.number < 1:
            raise PluginError(f"pipeline step {self.name!r} has number {self.number!r}: expected an int >= 1")

    def schema(self) -> dict:
        return schema_from_resource(self.params_schema)
