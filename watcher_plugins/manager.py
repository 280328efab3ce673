"""The plugin manager: hookspecs, then the built-ins, then entry points, then check_pending."""

from __future__ import annotations

import functools
import logging
import os
from importlib.metadata import entry_points
from typing import cast

import pluggy

from watcher_plugins import builtin, hookspecs
from watcher_plugins.errors import PluginError
from watcher_plugins.types import ModelType, WatcherExecutor, WatcherPipelineStep

log = logging.getLogger(__name__)

#: Comma-separated entry-point names not to load (``*`` blocks all third-party plugins).
BLOCK_ENV = "WATCHER_BLOCK_PLUGINS"


class WatcherPluginManager(pluggy.PluginManager):
    """pluggy's manager with one typed method per hook, so callers never touch ``pm.hook``."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs.WatcherSpecs)
        self._entry_points_loaded = False

    def load_plugins(self, *plugins: object, entry_points_too: bool = True) -> None:
        """Register the built-ins and the given plugins, then third-party entry points. Idempotent."""
        if self.get_plugin(builtin.PLUGIN_NAME) is None:
            self.register(builtin, name=builtin.PLUGIN_NAME)
        for plugin in plugins:
            if not self.is_registered(plugin):
                self.register(plugin)
        if entry_points_too and not self._entry_points_loaded:
            self._load_entry_points()
            self._entry_points_loaded = True
        try:
            self.check_pending()
        except pluggy.PluginValidationError as exc:  # a misspelled hookimpl must fail loudly, not be ignored
            raise PluginError(f"watcher plugin {self.get_name(exc.plugin)!r}: {exc}") from None

    def _load_entry_points(self) -> None:
        blocked = {name.strip() for name in os.environ.get(BLOCK_ENV, "").split(",") if name.strip()}
        if "*" in blocked:
            return
        for ep in entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            if ep.name in blocked or self.get_plugin(ep.name) is not None or self.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not take the host down
                log.warning("watcher plugin %r (%s) failed to load and is ignored: %s", ep.name, ep.value, exc)
                continue
            try:
                self.register(plugin, name=ep.name)
            except (ValueError, pluggy.PluginValidationError) as exc:
                raise PluginError(f"watcher plugin {ep.name!r} ({ep.value}) cannot be registered: {exc}") from None

    def get_executors(self) -> dict[str, WatcherExecutor]:
        """Every registered executor by name, sorted; a name registered twice is an error."""
        return _by_name(self.hook.watcher_executors(), "executor")

    def get_executor(self, name: str) -> WatcherExecutor:
        executors = self.get_executors()
        if name not in executors:
            raise PluginError(f"unknown executor {name!r}; registered executors: {', '.join(executors) or 'none'}")
        return executors[name]

    def get_pipeline_steps(self) -> dict[int, WatcherPipelineStep]:
        """Every registered step by number, sorted; a number or name registered twice is an error."""
        steps = _by_name(self.hook.watcher_pipeline_steps(), "pipeline step")
        by_number: dict[int, WatcherPipelineStep] = {}
        for step in steps.values():
            if step.number in by_number:
                raise PluginError(
                    f"pipeline step number {step.number} is registered twice: "
                    f"{by_number[step.number].name!r} and {step.name!r}"
                )
            by_number[step.number] = step
        return dict(sorted(by_number.items()))

    def get_model_types(self) -> dict[str, ModelType]:
        """Every declared model type by name, sorted. Each is declared by one executor registration, with a
        seed offset no other uses; an executor that names a model type nobody declares is an error."""
        executors = self.get_executors().values()
        declared: dict[str, ModelType] = {}
        owners: dict[str, str] = {}
        for executor in executors:
            for model_type in executor.declares:
                if model_type.name in declared:
                    raise PluginError(f"model type {model_type.name!r} is declared by both executors "
                                      f"{owners[model_type.name]!r} and {executor.name!r}")
                clash = [name for name, other in declared.items() if other.seed_offset == model_type.seed_offset]
                if clash:
                    raise PluginError(f"model type {model_type.name!r} (executor {executor.name!r}) has seed_offset "
                                      f"{model_type.seed_offset}, which {clash[0]!r} (executor {owners[clash[0]]!r}) "
                                      f"has already: each model type's sampler needs its own")
                declared[model_type.name] = model_type
                owners[model_type.name] = executor.name
        for executor in executors:
            for name in executor.model_types:
                if name not in declared:
                    raise PluginError(f"executor {executor.name!r} runs model type {name!r}, which no registration "
                                      f"declares (a ModelType with its search space); declared: "
                                      f"{', '.join(sorted(declared)) or 'none'}")
        return dict(sorted(declared.items()))

    def executor_for_model_types(self) -> dict[str, list[str]]:
        """Which executors can run each model type (names sorted)."""
        serving: dict[str, list[str]] = {}
        for executor in self.get_executors().values():
            for model_type in executor.model_types:
                serving.setdefault(cast(str, model_type), []).append(executor.name)  # names, after __post_init__
        return serving


def _by_name(results: list, kind: str) -> dict:
    flat: dict = {}
    for registrations in results:
        for registration in registrations or ():
            if registration.name in flat:
                raise PluginError(f"{kind} {registration.name!r} is registered by more than one plugin")
            flat[registration.name] = registration
    return dict(sorted(flat.items()))


@functools.cache
def get_plugin_manager() -> WatcherPluginManager:
    """The process-wide manager with every plugin loaded."""
    pm = WatcherPluginManager()
    pm.load_plugins()
    return pm
