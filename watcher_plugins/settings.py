"""Typed executor settings: a frozen dataclass per executor, built once from the params its schema owns.

The schema is where a setting's default is stated, and the only place: a field takes the param's value,
else the schema's default. The values are checked against the schema here too, so that a host that
merged params itself (no manifest) gets the same clear error as a manifest would.

    @dataclass(frozen=True)
    class RidgeSettings(ExecutorSettings):
        schema_ref: ClassVar[str] = "watcher_ridge:params.schema.json"
        ridge_max_iter: int

    settings = RidgeSettings.from_params(params)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from watcher_plugins.errors import ExecutorError, PluginError
from watcher_plugins.types import schema_from_resource

S = TypeVar("S", bound="ExecutorSettings")


@dataclasses.dataclass(frozen=True)
class ExecutorSettings:
    """Base of an executor's settings; fields are named like its params (see the module docstring)."""

    schema_ref: ClassVar[str | dict]

    @classmethod
    def schema_properties(cls) -> dict[str, dict]:
        """The properties of the executor's params schema; a field the schema lacks is the plugin's bug."""
        properties = schema_from_resource(cls.schema_ref).get("properties", {})
        unknown = [f.name for f in dataclasses.fields(cls) if f.name not in properties]
        if unknown:
            raise PluginError(f"{cls.__name__}: fields {', '.join(unknown)} are not params of its schema "
                              f"{cls.schema_ref!r}")
        return properties

    @classmethod
    def from_params(cls: type[S], params: Mapping[str, Any]) -> S:
        """The settings of these params (the run's merged params; others are ignored), defaults from the
        schema; ExecutorError naming every bad or missing param."""
        from watcher_plugins.manifest import validation_problems

        properties = cls.schema_properties()
        values: dict[str, Any] = {}
        missing = []
        for field in dataclasses.fields(cls):
            if field.name in params:
                values[field.name] = params[field.name]
            elif "default" in properties[field.name]:
                values[field.name] = copy.deepcopy(properties[field.name]["default"])
            else:
                missing.append(field.name)
        schema = {"type": "object", "properties": {name: properties[name] for name in values}}
        problems = validation_problems(values, schema, "params", "$")
        problems += [f"params::$.{name}: required (the schema gives it no default)" for name in missing]
        if problems:
            raise ExecutorError("; ".join(problems))
        return cls(**values)
