"""The hooks a watcher host calls. Plugins implement them with ``@watcher_plugins.hookimpl``.

One name, ``watcher``, serves both markers, the plugin manager and the entry-point group through
which the host discovers third-party plugins.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from watcher_plugins.types import WatcherExecutor, WatcherPipelineStep

PROJECT_NAME = "watcher"
ENTRY_POINT_GROUP = PROJECT_NAME

_hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class WatcherSpecs:
    """Hook specifications of the watcher host."""

    @_hookspec
    def watcher_executors(self) -> Iterable[WatcherExecutor]:
        """Register executors: the engines that run a batch of Optuna trials for some model types.

        Example::

            from watcher_plugins import hookimpl
            from watcher_plugins.types import WatcherExecutor

            @hookimpl
            def watcher_executors():
                yield WatcherExecutor(
                    name="my_executor",
                    model_types=("nn",),
                    load=lambda: __import__("my_pkg.executor").executor.MyExecutor,
                    params_schema="my_pkg:params.schema.json",
                )

        :return: an iterable of WatcherExecutor registrations.
        """

    @_hookspec
    def watcher_pipeline_steps(self) -> Iterable[WatcherPipelineStep]:
        """Register pipeline steps: numbered units of work the host runs with --run-pipeline.

        Example::

            from watcher_plugins import hookimpl
            from watcher_plugins.types import WatcherPipelineStep

            @hookimpl
            def watcher_pipeline_steps():
                yield WatcherPipelineStep(number=6, name="export_model", load=lambda: my_pkg.export.run)

        :return: an iterable of WatcherPipelineStep registrations.
        """
