"""Registration dataclasses: what a plugin yields from its hooks."""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from watcher_plugins.errors import PluginError

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _schema_from_resource(ref: str | dict | None) -> dict:
    """Load a params schema given inline or as ``package:file.json`` shipped as package data."""
    if ref is None:
        return {"type": "object", "properties": {}}
    if isinstance(ref, dict):
        return ref
    package, colon, filename = ref.partition(":")
    if not colon or not package or not filename:
        raise PluginError(f"params_schema {ref!r}: expected an inline schema or 'package:file.json'")
    try:
        return json.loads(resources.files(package).joinpath(filename).read_text(encoding="utf-8"))
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


@dataclass
class WatcherExecutor(WatcherPlugin):
    """An executor: runs batches of trials of the given model types.

    :param load: returns the Executor class; called only when the executor is used, so that heavy
        imports (torch, a tree library) stay out of the host process until needed.
    :param params_schema: the JSON Schema of the manifest params this executor owns, inline or as
        ``package:file.json``; its properties join the manifest's params schema.
    :param requires: for each model type, a module that must be importable for it to run.
    """

    model_types: tuple[str, ...] = ()
    load: Callable[[], type] = field(default=lambda: None, repr=False)
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
        self.model_types = tuple(self.model_types)
        if not self.model_types:
            raise PluginError(f"executor {self.name!r} registers no model_types")

    def schema(self) -> dict:
        return _schema_from_resource(self.params_schema)

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
    load: Callable[[], Callable[..., Any]] = field(default=lambda: None, repr=False)
    params_schema: str | dict | None = None
    description: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.number, int) or self.number < 1:
            raise PluginError(f"pipeline step {self.name!r} has number {self.number!r}: expected an int >= 1")

    def schema(self) -> dict:
        return _schema_from_resource(self.params_schema)
