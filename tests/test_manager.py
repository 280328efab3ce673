"""The plugin manager: built-ins register like third-party plugins; duplicates and unknown names fail loudly."""

from __future__ import annotations

import pytest

from watcher_plugins import hookimpl
from watcher_plugins.errors import PluginError
from watcher_plugins.manager import WatcherPluginManager
from watcher_plugins.types import WatcherExecutor, WatcherPipelineStep


def test_builtins_register_executors_and_step_5(plugin_manager):
    executors = plugin_manager.get_executors()
    assert list(executors) == ["nn_batch", "tree_parallel"]
    assert executors["tree_parallel"].model_types == ("catboost", "lightgbm", "xgboost")
    steps = plugin_manager.get_pipeline_steps()
    assert list(steps) == [5] and steps[5].name == "compare_models"
    assert plugin_manager.executor_for_model_types()["nn"] == ["nn_batch"]


def test_load_plugins_is_idempotent(plugin_manager):
    plugin_manager.load_plugins(entry_points_too=False)
    assert list(plugin_manager.get_executors()) == ["nn_batch", "tree_parallel"]


def test_duplicate_executor_name_is_an_error(plugin_manager):
    class Duplicate:
        @hookimpl
        def watcher_executors(self):
            yield WatcherExecutor(name="nn_batch", model_types=("nn",), load=lambda: None)

    plugin_manager.register(Duplicate())
    with pytest.raises(PluginError, match="executor 'nn_batch' is registered by more than one plugin"):
        plugin_manager.get_executors()


def test_duplicate_step_number_is_an_error(plugin_manager):
    class Another5:
        @hookimpl
        def watcher_pipeline_steps(self):
            yield WatcherPipelineStep(name="other", number=5, load=lambda: None)

    plugin_manager.register(Another5())
    with pytest.raises(PluginError, match="pipeline step number 5 is registered twice: 'compare_models' and 'other'"):
        plugin_manager.get_pipeline_steps()


def test_unknown_executor_lists_the_choices(plugin_manager):
    with pytest.raises(PluginError, match="unknown executor 'gpu_magic'; registered executors: nn_batch, tree_parallel"):
        plugin_manager.get_executor("gpu_magic")


def test_misspelled_hookimpl_fails_check_pending():
    class Misspelled:
        @hookimpl
        def watcher_executor(self):  # singular: not a hook
            return []

    pm = WatcherPluginManager()
    with pytest.raises(PluginError, match="unknown hook 'watcher_executor'"):
        pm.load_plugins(Misspelled(), entry_points_too=False)


@pytest.mark.parametrize("name", ["Bad Name", "", "9lives"])
def test_registration_names_are_checked(name):
    with pytest.raises(PluginError, match="name .* is invalid"):
        WatcherExecutor(name=name, model_types=("nn",))


def test_executor_reports_a_missing_requirement_with_the_install_command():
    executor = WatcherExecutor(name="x", model_types=("nn",), requires={"nn": "no_such_module_xyz"},
                               install_hint="pip install no-such")
    assert executor.missing_requirement("nn") == "no_such_module_xyz is not installed; install it with: pip install no-such"
    assert WatcherExecutor(name="y", model_types=("nn",), requires={"nn": "json"}).missing_requirement("nn") is None


def test_a_broken_third_party_entry_point_is_a_warning(monkeypatch, caplog):
    from importlib.metadata import EntryPoint

    broken = EntryPoint(name="broken", value="no_such_module_xyz.plugin", group="watcher")
    monkeypatch.setattr("watcher_plugins.manager.entry_points", lambda group: [broken])
    monkeypatch.delenv("WATCHER_BLOCK_PLUGINS", raising=False)
    pm = WatcherPluginManager()
    pm.load_plugins()
    assert "watcher plugin 'broken'" in caplog.text and "failed to load" in caplog.text
    assert list(pm.get_executors()) == ["nn_batch", "tree_parallel"]


def test_a_third_party_plugin_with_a_bad_hookimpl_is_a_plugin_error(tmp_path, monkeypatch):
    from importlib.metadata import EntryPoint

    (tmp_path / "bad_watcher_plugin.py").write_text(
        "from watcher_plugins import hookimpl\n\n@hookimpl\ndef watcher_executors(bogus):\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = EntryPoint(name="bad", value="bad_watcher_plugin", group="watcher")
    monkeypatch.setattr("watcher_plugins.manager.entry_points", lambda group: [bad])
    monkeypatch.delenv("WATCHER_BLOCK_PLUGINS", raising=False)
    with pytest.raises(PluginError, match=r"watcher plugin 'bad' \(bad_watcher_plugin\) cannot be registered: (.|\n)*bogus"):
        WatcherPluginManager().load_plugins()
