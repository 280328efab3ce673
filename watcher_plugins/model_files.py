"""The JSON description files executors save beside a model (nn_model.json, tree_model.json, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_versioned_json(path: Path, what: str, version: int) -> dict[str, Any]:
    """The JSON object at ``path``, of format_version ``version``; a ValueError names the file and what is
    wrong with a missing, unreadable or foreign one (``what``: "the NN model's description")."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from None
    found = obj.get("format_version") if isinstance(obj, dict) else None
    if found != version:
        raise ValueError(f"{path}: format_version {found!r}: expected {version}")
    return obj
