"""Load and validate manifests and --params overrides against the shipped JSON Schemas.

Errors are reported the way check-jsonschema does: every problem, sorted, one line each, as
``SOURCE::$.json.path: message``. Nothing is written anywhere before validation passes.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema.exceptions import ValidationError, best_match

from watcher_plugins.errors import ManifestError, PluginError
from watcher_plugins.schema_files import read_schema, shipped_path

PARAMS_LABEL = "--params"


def default_manifest_path() -> Path:
    """The shipped reinforcement.json (package data)."""
    return shipped_path("watcher_plugins.agent_manifests", "reinforcement.json")


def _load_schema(filename: str) -> dict:
    return read_schema(filename)


def params_schema(pm) -> dict:
    """The params schema: the properties of every registered step and executor, merged; no other keys."""
    properties: dict[str, Any] = {}
    owners: dict[str, str] = {}
    registrations = [*pm.get_pipeline_steps().values(), *pm.get_executors().values()]
    for registration in registrations:
        for key, subschema in registration.schema().get("properties", {}).items():
            if key in properties:
                raise PluginError(f"param {key!r} is declared by both {owners[key]!r} and {registration.name!r}")
            properties[key] = subschema
            owners[key] = registration.name
    registered = {"model_types": list(pm.get_model_types())}
    return {"type": "object", "additionalProperties": False, "properties": _with_registered(properties, registered)}


def _with_registered(schema: Any, registered: dict[str, list[str]]) -> Any:
    """``schema`` with every ``{"x-registered": KIND}`` given the enum of what is registered of that kind
    (the model types), so that a schema names what plugins add without listing it."""
    if isinstance(schema, dict):
        out = {key: _with_registered(value, registered) for key, value in schema.items()}
        if "x-registered" in schema:
            out["enum"] = registered[schema["x-registered"]]
        return out
    if isinstance(schema, list):
        return [_with_registered(value, registered) for value in schema]
    return schema


def _validator(schema: dict):
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    # JSON Schema counts 2.0 as an integer; the code that takes these params wants a Python int.
    strict = cls.TYPE_CHECKER.redefine("integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
    return jsonschema.validators.extend(cls, type_checker=strict)(schema, format_checker=cls.FORMAT_CHECKER)


def _json_path(error: ValidationError, prefix: str) -> str:
    path = prefix
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _meant_branch(error: ValidationError) -> list[ValidationError] | None:
    """Of a oneOf's errors, those of the branch the instance means to be: the one whose required keys it
    has (``{"path": ..., "targt": ...}`` means the file branch, whatever else is wrong with it)."""
    branches = error.schema.get(error.validator) if isinstance(error.schema, dict) else None
    if not isinstance(error.instance, dict) or not isinstance(branches, list):
        return None
    for i, branch in enumerate(branches):
        required = branch.get("required") if isinstance(branch, dict) else None
        if required and all(key in error.instance for key in required):
            return [e for e in error.context if e.schema_path and e.schema_path[0] == i] or None
    return None


def _message(error: ValidationError) -> str:
    expected = error.schema.get("x-expected") if isinstance(error.schema, dict) else None
    if error.validator in ("oneOf", "anyOf"):
        meant = _meant_branch(error)
        detail = best_match(meant or error.context) if error.context else None
        if expected:
            suffix = ""
            if detail is not None and (meant or len(detail.relative_path) > 0):
                where = _json_path(detail, "$")[2:]
                suffix = f" ({where + ': ' if where else ''}{_message(detail)})"
            return f"{json.dumps(error.instance)} is not valid: expected {expected}{suffix}"
        if detail is not None:
            return detail.message
    if error.validator == "pattern" and expected:  # a regex says little to a person (NUL: "^[^\\u0000]*$")
        return f"{json.dumps(error.instance)} is not valid: expected {expected}"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = list(error.schema.get("properties", {}))
        extras = [key for key in error.instance if key not in allowed]
        hints = []
        for key in extras:
            close = difflib.get_close_matches(key, allowed, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return f"unknown key {', '.join(hints)}; expected one of: {', '.join(sorted(allowed))}"
    return error.message


def validation_problems(instance: Any, schema: dict, source: str, prefix: str) -> list[str]:
    """Every problem of ``instance`` against ``schema``, sorted, one ``SOURCE::$.path: message`` each."""
    errors = sorted(_validator(schema).iter_errors(instance), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [f"{source}::{_json_path(e, prefix)}: {_message(e)}" for e in errors]


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is beyond a float's range")
    return value


def _not_json(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _parse_json(text: str, source: str) -> Any:
    try:
        # Python's decoder takes NaN and Infinity, and 1e400 as inf; a param must be a finite number.
        return json.loads(text, parse_float=_finite, parse_constant=_not_json)
    except json.JSONDecodeError as exc:
        raise ManifestError([f"{source}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"]) from None
    except ValueError as exc:
        raise ManifestError([f"{source}: not valid JSON: {exc}"]) from None


class Params(dict):
    """The merged params, remembering where each came from, so that a problem found only when a step uses
    a value (a GPU that is not there, an output_dir that cannot be written) names its source as a schema
    error would: the manifest file or --params."""

    def __init__(self, values: dict, origins: dict[str, tuple[str, str]], manifest: str):
        super().__init__(values)
        self._origins = origins  # top-level key -> (source, JSON path of the object that set it)
        self._manifest = manifest

    def where(self, path: str) -> str:
        """``SOURCE::$.path`` of a param (``path`` is dotted: ``executors.nn``). A key neither source set
        names the manifest, where it would be set, and says its value is the default."""
        key = path.split(".")[0]
        if key in self._origins:
            source, prefix = self._origins[key]
            return f"{source}::{prefix}.{path}"
        return f"{self._manifest}::$.params.{path} (the default)"

    def sources(self, keys: Iterable[str]) -> list[str]:
        """The sources (the manifest file, --params) that set any of ``keys``; the manifest if none did."""
        return sorted({self._origins[key][0] for key in keys if key in self._origins}) or [self._manifest]


def where(params: Mapping[str, Any], path: str) -> str:
    """``SOURCE::$.path`` of a param, for messages; a plain dict (a host that merged params itself) has no
    sources to name, so it says ``params``."""
    return params.where(path) if isinstance(params, Params) else f"params::$.{path}"


def sources(params: Mapping[str, Any], keys: Iterable[str]) -> str:
    """The sources that set any of ``keys``, for messages about several params at once."""
    return ", ".join(params.sources(keys)) if isinstance(params, Params) else "params"


@dataclass
class ResolvedManifest:
    """A validated manifest: its source, its raw document and the params with defaults filled in."""

    path: Path
    document: dict
    params: Params


def _read_manifest(path: Path, source: str, schema: dict) -> tuple[Any, list[str]]:
    """The manifest's document (None if it has none) and its problems."""
    try:
        document = _parse_json(path.read_text(encoding="utf-8"), source)
    except FileNotFoundError:
        return None, [f"{source}: manifest file not found"]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [f"{source}: cannot read the manifest: {exc}"]
    except ManifestError as exc:
        return None, exc.problems
    problems = validation_problems(document, _load_schema("manifest.schema.json"), source, "$")
    if isinstance(document, dict) and isinstance(document.get("params"), dict):
        problems += validation_problems(document["params"], schema, source, "$.params")
    return document, problems


def _read_override(text: str | None, schema: dict) -> tuple[dict, list[str]]:
    """The --params object ({} if none was given, or if it has problems) and its problems."""
    if text is None:
        return {}, []
    try:
        override = _parse_json(text, PARAMS_LABEL)
    except ManifestError as exc:
        return {}, exc.problems
    if not isinstance(override, dict):
        return {}, [f"{PARAMS_LABEL}::$: expected a JSON object, got {type(override).__name__}"]
    return override, validation_problems(override, schema, PARAMS_LABEL, "$")


def load_manifest(path: str | Path | None, params_override: str | None, pm) -> ResolvedManifest:
    """Read, validate and merge a manifest and a --params JSON text; raise ManifestError with every problem."""
    manifest_path = Path(path) if path is not None else default_manifest_path()
    source = str(manifest_path)
    schema = params_schema(pm)
    document, problems = _read_manifest(manifest_path, source, schema)

    # --params is checked even when the manifest has problems: one run reports every problem of both.
    override, override_problems = _read_override(params_override, schema)
    problems += override_problems
    if problems:
        raise ManifestError(problems)

    values = {key: copy.deepcopy(sub["default"]) for key, sub in schema["properties"].items() if "default" in sub}
    values.update(copy.deepcopy(document["params"]))
    values.update(copy.deepcopy(override))
    origins = {key: (source, "$.params") for key in document["params"]} | {key: (PARAMS_LABEL, "$") for key in override}
    return ResolvedManifest(path=manifest_path, document=document, params=Params(values, origins, source))
