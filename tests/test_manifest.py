"""Manifest and --params validation: every problem reported, with file, JSON path and expectation."""

from __future__ import annotations

import json
import re

import pytest

from watcher_plugins import hookimpl
from watcher_plugins.errors import ManifestError, PluginError
from watcher_plugins.manifest import default_manifest_path, load_manifest, params_schema
from watcher_plugins.types import WatcherExecutor


def _write(tmp_path, document, name="m.json"):
    path = tmp_path / name
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    return path


def _problems(excinfo) -> list[str]:
    return excinfo.value.problems


def test_shipped_manifest_is_valid_and_defaults_are_filled(plugin_manager):
    resolved = load_manifest(None, None, plugin_manager)
    assert resolved.path == default_manifest_path()
    params = resolved.params
    assert params["compare_models"] is True
    assert params["model_types"] == ["nn", "catboost", "lightgbm", "xgboost"]
    # keys the manifest leaves out come from the schemas' defaults
    assert params["lease_timeout_s"] == 600
    assert params["storage"] is None


def test_params_override_replaces_manifest_values(plugin_manager):
    resolved = load_manifest(None, '{"trials": 2, "tree_parallel_workers": 3, "devices": [0]}', plugin_manager)
    assert resolved.params["trials"] == 2
    assert resolved.params["tree_parallel_workers"] == 3
    assert resolved.params["devices"] == [0]
    assert resolved.params["folds"] == 3  # untouched keys stay


def test_manifest_not_json_names_file_line_and_column(tmp_path, plugin_manager):
    path = _write(tmp_path, '{"params": {"trials": 3,}}')
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(path, None, plugin_manager)
    (problem,) = _problems(excinfo)
    assert problem.startswith(f"{path}: not valid JSON")
    assert "line 1 column" in problem


def test_missing_manifest_file(tmp_path, plugin_manager):
    with pytest.raises(ManifestError, match="manifest file not found"):
        load_manifest(tmp_path / "nope.json", None, plugin_manager)


def test_every_schema_error_is_reported_with_its_json_path(tmp_path, plugin_manager):
    path = _write(tmp_path, {"params": {"n_concurrent_nn": 0, "tree_parallel_workers": -1, "trials": "many",
                                        "trails": 3, "model_types": ["nn", "svm"]}})
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(path, None, plugin_manager)
    problems = _problems(excinfo)
    assert len(problems) == 5
    assert all(p.startswith(f"{path}::$.params") for p in problems)
    text = "\n".join(problems)
    assert f"{path}::$.params.n_concurrent_nn: 0 is not valid: expected \"auto\" or an integer >= 1" in text
    assert f"{path}::$.params.tree_parallel_workers: -1 is not valid: expected \"auto\" or an integer >= 1" in text
    assert f"{path}::$.params.trials: 'many' is not of type 'integer'" in text
    assert "unknown key 'trails' (did you mean 'trials'?)" in text
    assert f"{path}::$.params.model_types[1]: 'svm' is not one of" in text


def test_bad_params_override_is_labelled_params(plugin_manager):
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(None, '{"n_concurrent_nn": 0, "tree_parallel_workers": -1, "catboost_gpu_ram_part": 0, '
                            '"xgboost_gpu_fold_threads": 0, "tree_gpu_worker_cores": "lots", '
                            '"xgboost_gpu_async_pool": "yes"}', plugin_manager)
    assert _problems(excinfo) == [
        '--params::$.catboost_gpu_ram_part: 0 is not valid: expected "auto" or a number in (0, 1]',
        '--params::$.n_concurrent_nn: 0 is not valid: expected "auto" or an integer >= 1',
        '--params::$.tree_gpu_worker_cores: "lots" is not valid: expected "auto" or an integer >= 1',
        "--params::$.tree_parallel_workers: -1 is not valid: expected \"auto\" or an integer >= 1",
        "--params::$.xgboost_gpu_async_pool: 'yes' is not of type 'boolean'",
        '--params::$.xgboost_gpu_fold_threads: 0 is not valid: expected "auto" or an integer >= 1',
    ]


@pytest.mark.parametrize("text, expected", [
    # JSON Schema counts 2.0 as an integer; the code that takes folds, trials or rows wants an int.
    ('{"folds": 2.0}', "--params::$.folds: 2.0 is not of type 'integer'"),
    ('{"n_concurrent_nn": 2.0}', '--params::$.n_concurrent_nn: 2.0 is not valid: expected "auto" or an integer >= 1'),
    ('{"data": {"embedded": "survivors", "rows": 300.0}}', "(data.rows: 300.0 is not of type 'integer')"),
    # Python's decoder takes these; no param can use them.
    ('{"lease_timeout_s": 1e400}', "--params: not valid JSON: the number 1e400 is beyond a float's range"),
    ('{"lease_timeout_s": NaN}', "--params: not valid JSON: NaN is not a JSON number"),
    # Of a data param's two forms, the error of the one it means: found by its required key.
    ('{"data": {"embedded": "survivors", "rows": 10}}', "(data.rows: 10 is less than the minimum of 50)"),
    ('{"data": {"path": "x.csv", "targt": "q"}}', "(data: unknown key 'targt' (did you mean 'target'?)"),
])
def test_params_a_python_reader_would_misread_are_refused(plugin_manager, text, expected):
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(None, text, plugin_manager)
    assert expected in _problems(excinfo)[0]


@pytest.mark.parametrize("text, expected", [
    ("{bad", "--params: not valid JSON"),
    ("[1, 2]", "--params::$: expected a JSON object, got list"),
])
def test_params_that_is_not_a_json_object(plugin_manager, text, expected):
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(None, text, plugin_manager)
    assert _problems(excinfo)[0].startswith(expected)


def test_envelope_errors(tmp_path, plugin_manager):
    path = _write(tmp_path, {"parms": {}})
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(path, None, plugin_manager)
    text = "\n".join(_problems(excinfo))
    assert f"{path}::$: 'params' is a required property" in text
    assert "unknown key 'parms' (did you mean 'params'?)" in text


def test_plugins_contribute_params_and_a_clash_is_an_error(plugin_manager):
    class ExtraParams:
        @hookimpl
        def watcher_executors(self):
            yield WatcherExecutor(name="extra", model_types=("nn",), load=lambda: None,
                                  params_schema={"properties": {"extra_knob": {"type": "integer", "default": 7}}})

    plugin_manager.register(ExtraParams())
    assert load_manifest(None, '{"extra_knob": 9}', plugin_manager).params["extra_knob"] == 9

    class Clash:
        @hookimpl
        def watcher_executors(self):
            yield WatcherExecutor(name="clash", model_types=("nn",), load=lambda: None,
                                  params_schema={"properties": {"trials": {"type": "integer"}}})

    plugin_manager.register(Clash())
    with pytest.raises(PluginError, match="param 'trials' is declared by both 'compare_models' and 'clash'"):
        params_schema(plugin_manager)


@pytest.mark.parametrize("ref, expected", [
    ("my_pkg/params.schema.json", "expected an inline schema or 'package:file.json'"),
    ("no_such_package_here:params.schema.json", "cannot load the schema: No module named 'no_such_package_here'"),
    ("watcher_plugins.schemas:missing.json", "cannot load the schema"),
])
def test_a_plugins_params_schema_that_cannot_be_loaded_is_a_plugin_error(plugin_manager, ref, expected):
    class BadSchema:
        @hookimpl
        def watcher_executors(self):
            yield WatcherExecutor(name="bad_schema", model_types=("nn",), load=lambda: None, params_schema=ref)

    plugin_manager.register(BadSchema())
    with pytest.raises(PluginError, match=f"params_schema {ref!r}: " + re.escape(expected)):
        params_schema(plugin_manager)


def test_params_problems_are_reported_with_the_manifests(tmp_path, plugin_manager):
    # One run shows every problem of both sources, not the manifest's first and --params' after a fix.
    path = _write(tmp_path, {"params": {"trials": 0}})
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(path, '{"folds": 1, "seed": -1}', plugin_manager)
    assert _problems(excinfo) == [
        f"{path}::$.params.trials: 0 is less than the minimum of 1",
        "--params::$.folds: 1 is less than the minimum of 2",
        "--params::$.seed: -1 is less than the minimum of 0",
    ]
    not_json = _write(tmp_path, "{", name="broken.json")
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(not_json, "[1]", plugin_manager)
    problems = _problems(excinfo)
    assert len(problems) == 2 and problems[0].startswith(f"{not_json}: not valid JSON")
    assert problems[1] == "--params::$: expected a JSON object, got list"
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(tmp_path / "missing.json", "{bad", plugin_manager)
    assert [p.split(":")[0] for p in _problems(excinfo)] == [str(tmp_path / "missing.json"), "--params"]


@pytest.mark.parametrize("override, expected", [
    ({"output_dir": "/tmp/x\u0000y"}, '--params::$.output_dir: "/tmp/x\\u0000y" is not valid: expected a path without '
                                       'NUL characters'),
    ({"lease_dir": "l\u0000"}, '--params::$.lease_dir: "l\\u0000" is not valid: expected a path without NUL characters'),
    ({"data": {"path": "d\u0000.csv", "target": "y"}}, '(data.path: "d\\u0000.csv" is not valid: expected a path '
                                                     'without NUL characters)'),
])
def test_a_path_with_a_nul_character_is_refused_naming_its_json_path(plugin_manager, override, expected):
    # The OS cannot take such a path: Python raises ValueError ("embedded null byte") at the first use.
    with pytest.raises(ManifestError) as excinfo:
        load_manifest(None, json.dumps(override), plugin_manager)
    (problem,) = _problems(excinfo)
    assert problem == expected or problem.endswith(expected)


def test_params_remember_which_source_set_each_value(tmp_path, plugin_manager):
    path = _write(tmp_path, {"params": {"devices": "cpu", "executors": {"nn": "nn_batch"}}})
    params = load_manifest(path, '{"output_dir": "elsewhere"}', plugin_manager).params
    assert params.where("devices") == f"{path}::$.params.devices"
    assert params.where("executors.nn") == f"{path}::$.params.executors.nn"
    assert params.where("output_dir") == "--params::$.output_dir"
    assert params.where("storage") == f"{path}::$.params.storage (the default)"
    assert params.sources(["devices", "output_dir"]) == ["--params", str(path)]
    assert params.sources(["storage"]) == [str(path)]
    assert json.loads(json.dumps(params))["output_dir"] == "elsewhere"  # still a plain JSON object
