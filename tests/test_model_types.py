"""Model types are registrations: each declared once, with its search space and its own seed offset; the
manifest schema's enums list what is registered; a declared type runs through step 5 with its own
search space and sampler seed, and the built-ins keep the offsets their studies were made with."""

from __future__ import annotations

import dataclasses
import json

import optuna
import pytest

from watcher_plugins import hookimpl
from watcher_plugins.errors import ExecutorError, ManifestError, PluginError
from watcher_plugins.executor import Executor
from watcher_plugins.manifest import load_manifest, params_schema
from watcher_plugins.records import STATUS_OK, FoldResult
from watcher_plugins.settings import ExecutorSettings
from watcher_plugins.types import ModelType, WatcherExecutor

SCHEMA = {"type": "object", "properties": {"const_value": {"type": "number", "default": 0.25}}}


def suggest_const(trial: optuna.Trial) -> dict:
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


@dataclasses.dataclass(frozen=True)
class ConstSettings(ExecutorSettings):
    schema_ref = SCHEMA
    const_value: float


class ConstExecutor(Executor):
    """Every fold scores the trial's own x plus const_value: what the study sees is its search space's."""

    def run_batch(self, jobs, on_result=None):
        settings = ConstSettings.from_params(self.params)
        out = [FoldResult(job.trial_number, k, job.model_type, job.params["x"] + settings.const_value, 0.0, STATUS_OK)
               for job in jobs for k in range(job.folds)]
        for result in out:
            on_result(result)
        return out


def plugin(*model_types, name="const"):
    class Plugin:
        @hookimpl
        def watcher_executors(self):
            yield WatcherExecutor(name=name, model_types=model_types, load=lambda: ConstExecutor,
                                  params_schema=SCHEMA if name == "const" else None)

    return Plugin()


def test_builtins_declare_their_model_types_with_the_offsets_their_studies_were_made_with(plugin_manager):
    declared = plugin_manager.get_model_types()
    assert {name: m.seed_offset for name, m in declared.items()} == {"catboost": 1, "lightgbm": 2, "nn": 0,
                                                                     "xgboost": 3}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert set(declared["nn"].search_space(study.ask())) == {"hidden_layers", "lr", "weight_decay", "dropout"}


def test_the_schema_enums_list_the_registered_model_types(plugin_manager):
    plugin_manager.register(plugin(ModelType("const", suggest_const, seed_offset=7)))
    properties = params_schema(plugin_manager)["properties"]
    names = ["catboost", "const", "lightgbm", "nn", "xgboost"]
    assert properties["model_types"]["items"]["enum"] == names
    assert properties["executors"]["propertyNames"]["enum"] == names


def test_an_unregistered_model_type_is_a_manifest_error_naming_the_registered_ones(plugin_manager, tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"params": {"model_types": ["nn", "const"]}}))
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest, None, plugin_manager)
    assert f"{manifest}::$.params.model_types[1]: 'const' is not one of ['catboost', 'lightgbm', 'nn', 'xgboost']" \
        in "\n".join(info.value.problems)


@pytest.mark.parametrize("second, message", [
    (plugin(ModelType("nn", suggest_const, seed_offset=9)), "model type 'nn' is declared by both executors 'const' and 'nn_batch'"),
    (plugin(ModelType("const", suggest_const, seed_offset=2)), "'lightgbm' .* has seed_offset 2, which 'const' .* has already"),
    (plugin("nonesuch"), "executor 'const' runs model type 'nonesuch', which no registration declares"),
])
def test_a_model_type_declared_twice_a_shared_seed_offset_or_an_undeclared_name_fail_loudly(plugin_manager, second,
                                                                                           message):
    plugin_manager.register(second)
    with pytest.raises(PluginError, match=message):
        plugin_manager.get_model_types()


def test_an_executor_may_run_a_model_type_another_registration_declares(plugin_manager):
    plugin_manager.register(plugin("nn", name="other_nn"))
    assert plugin_manager.executor_for_model_types()["nn"] == ["nn_batch", "other_nn"]
    assert "nn" in plugin_manager.get_model_types()


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "Bad-Name", "search_space": suggest_const, "seed_offset": 1}, "model type name 'Bad-Name' is invalid"),
    ({"name": "ok", "search_space": suggest_const, "seed_offset": -1}, "seed_offset -1: expected an int >= 0"),
    ({"name": "ok", "search_space": None, "seed_offset": 1}, "search_space must be callable"),
])
def test_a_bad_model_type_declaration_is_refused(kwargs, message):
    with pytest.raises(PluginError, match=message):
        ModelType(**kwargs)


def test_a_plugin_model_type_runs_through_step_5_with_its_search_space_and_seed_offset(plugin_manager, tmp_path):
    from watcher_plugins.compare_models import run_compare_models

    plugin_manager.register(plugin(ModelType("const", suggest_const, seed_offset=7)))
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"params": {
        "model_types": ["const"], "trials": 3, "output_dir": str(tmp_path / "out"), "progress": False,
        "devices": "cpu", "data": {"embedded": "survivors", "rows": 200}, "const_value": 0.5}}))
    params = load_manifest(manifest, None, plugin_manager).params
    summary = run_compare_models(params, plugin_manager)
    study = optuna.load_study(study_name="compare_models-const", storage=f"sqlite:///{tmp_path / 'out' / 'optuna.db'}")
    assert study.user_attrs["sampler_seed"] == 42 + 7  # the run's seed plus the type's own offset
    xs = [trial.params["x"] for trial in study.trials]
    assert len(xs) == 3 and all(trial.value == x + 0.5 for trial, x in zip(study.trials, xs))
    (row,) = summary["leaderboard"]
    assert row["model_type"] == "const" and row["executor"] == "const" and row["best_score"] == max(xs) + 0.5
    lines = [json.loads(line) for line in (tmp_path / "out" / "trials.jsonl").read_text().splitlines()]
    assert sorted(line["r2"] for line in lines) == sorted(x + 0.5 for x in xs for _ in range(3))


def test_settings_take_the_schema_default_and_name_a_bad_param():
    assert ConstSettings.from_params({}).const_value == 0.25
    assert ConstSettings.from_params({"const_value": 2, "other": "ignored"}).const_value == 2
    with pytest.raises(ExecutorError, match=r"params::\$.const_value: 'high' is not of type 'number'"):
        ConstSettings.from_params({"const_value": "high"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        ConstSettings.from_params({}).const_value = 1.0  # type: ignore[misc]


def test_a_settings_field_the_schema_lacks_is_the_plugins_bug():
    @dataclasses.dataclass(frozen=True)
    class Stray(ExecutorSettings):
        schema_ref = SCHEMA
        not_in_schema: int = 0

    with pytest.raises(PluginError, match="fields not_in_schema are not params of its schema"):
        Stray.from_params({})
