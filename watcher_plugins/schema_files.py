"""The data files this package ships from folders beside it (schemas/ as ``watcher_plugins.schemas``,
agent_manifests/ as ``watcher_plugins.agent_manifests``; setup.cfg maps them), read the same way whether
the package is installed or imported from a source checkout."""

from __future__ import annotations

import copy
import json
from functools import cache
from importlib import resources
from pathlib import Path

import watcher_plugins

_CHECKOUT = Path(watcher_plugins.__file__).resolve().parent.parent
#: package -> its folder in a source checkout
_CHECKOUT_FOLDERS = {"watcher_plugins.schemas": "schemas", "watcher_plugins.agent_manifests": "agent_manifests"}


def shipped_path(package: str, filename: str) -> Path:
    """Where a shipped file is. Imported from a source checkout, not installed (a worker started with
    `python -m` from the repository root, or PYTHONPATH=checkout), the folder is beside the package,
    not in it."""
    try:
        return Path(str(resources.files(package).joinpath(filename)))
    except ModuleNotFoundError:
        if package not in _CHECKOUT_FOLDERS:
            raise
        return _CHECKOUT / _CHECKOUT_FOLDERS[package] / filename


def read_schema(filename: str) -> dict:
    """One shipped schema (schemas/FILENAME), parsed; the caller's own copy."""
    return copy.deepcopy(_parsed("watcher_plugins.schemas", filename))


@cache
def _parsed(package: str, filename: str) -> dict:
    return json.loads(shipped_path(package, filename).read_text(encoding="utf-8"))
