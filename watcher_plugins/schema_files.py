"""The JSON Schemas this package ships (schemas/, installed as ``watcher_plugins.schemas``), read the same
way whether the package is installed or imported from a source checkout."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

import watcher_plugins

_CHECKOUT_SCHEMAS = Path(watcher_plugins.__file__).resolve().parent.parent / "schemas"


@cache
def read_schema(filename: str) -> dict:
    """One shipped schema, parsed (callers must not change it)."""
    try:
        text = resources.files("watcher_plugins.schemas").joinpath(filename).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        # Imported from a source checkout, not installed: a worker started with `python -m` from the
        # repository root has the checkout first on sys.path, and schemas/ is beside the package, not in it.
        text = (_CHECKOUT_SCHEMAS / filename).read_text(encoding="utf-8")
    return json.loads(text)
