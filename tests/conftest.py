"""Shared fixtures. Tests in test_tree_*.py need the tree libraries: they carry the `trees` marker,
which the tox env `trees` selects and `unit` deselects. test_nn_triton_interpreter.py runs the Triton
kernels under Triton's interpreter: it is collected only where Triton imports and TRITON_INTERPRET=1
(the tox env `kernels` sets both up)."""

from __future__ import annotations

import importlib.util
import os

import pytest
from sigint_default import MARKER as SENDS_SIGINT
from sigint_default import default_sigint

from watcher_plugins import faults
from watcher_plugins.manager import WatcherPluginManager
from watcher_plugins.records import TrialJob

collect_ignore = []
if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore.append("test_nn_triton_interpreter.py")


def pytest_configure(config):
    config.addinivalue_line("markers", f"{SENDS_SIGINT}: sends SIGINT to the test's own process, which then "
                            "runs with SIGINT's default handler however the suite was launched (sigint_default.py)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name.startswith("test_tree_"):
            item.add_marker(pytest.mark.trees)


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    """Every test gets its own lease directory; the dataset cache is shared within the session."""
    monkeypatch.setenv("WATCHER_LEASE_DIR", str(tmp_path_factory.mktemp("leases")))
    monkeypatch.setenv("WATCHER_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _sigint_default_for_tests_that_send_it(request):
    """A test marked sends_sigint gets SIGINT's default handler back, even where the suite was started with
    SIGINT ignored (``nohup tox &``): Python leaves an inherited SIG_IGN in place."""
    if request.node.get_closest_marker(SENDS_SIGINT) is None:
        yield
        return
    with default_sigint():
        yield


@pytest.fixture
def plugin_manager() -> WatcherPluginManager:
    """A fresh manager with the built-ins only (no entry points)."""
    pm = WatcherPluginManager()
    pm.load_plugins(entry_points_too=False)
    return pm


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for this test session (skipped only where no server binaries exist and CI
    did not ask for them)."""
    import os

    from postgres_server import REQUIRE_ENV, PostgresServer, find_pg_bin

    pytest.importorskip("psycopg")
    pg_bin = find_pg_bin()
    if pg_bin is None:
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{REQUIRE_ENV} is set but no PostgreSQL server binaries (initdb) were found")
        pytest.skip("no PostgreSQL server binaries (initdb): apt-get install postgresql")
    server = PostgresServer(pg_bin).start()
    yield server
    server.remove()


@pytest.fixture
def inject(monkeypatch):
    """``inject(job, fault)``: the job, with its fault put in WATCHER_FAULTS (watcher_plugins/faults.py,
    tree_trials). The workers inherit it and read it as they start: inject before the pool starts them."""
    chosen: dict[str, str | dict] = {}

    def inject(job: TrialJob, fault: str | dict) -> TrialJob:
        chosen[faults.trial_key(job.model_type, job.trial_number)] = fault
        monkeypatch.setenv(faults.ENV, faults.encode(tree_trials=chosen))
        return job

    return inject
