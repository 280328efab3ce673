"""The tree_parallel executor end to end on CPU: results independent of the worker count, worker
isolation (fresh interpreters, no torch, pinned GPU and cores), and GPU/CPU scheduling."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher_plugins.builtin import _tree_parallel_executor
from watcher_plugins.errors import ExecutorError
from watcher_plugins.executor import Executor, RunContext
from watcher_plugins.records import DataRef, TrialJob
from watcher_plugins.tree_parallel import executor as tree_executor
from watcher_plugins.tree_parallel.executor import TreeParallelExecutor
from watcher_plugins.tree_parallel.libraries import FitSettings
from watcher_plugins.tree_parallel.trial import run_trial, sample_params

DATA = DataRef(embedded="survivors", rows=1500)
FAST = {"tree_rounds": 30, "tree_early_stopping_rounds": 10}
GB = 10 ** 9


@pytest.fixture
def trees():
    for lib in ("catboost", "lightgbm", "xgboost", "optuna"):
        pytest.importorskip(lib)


def _jobs(model_types=("catboost", "lightgbm", "xgboost"), trials=2, folds=3):
    return [TrialJob(m, t, sample_params(m, t, 11), DATA, folds, seed=11) for t in range(trials) for m in model_types]


def _executor(tmp_path: Path, devices=(), **params) -> TreeParallelExecutor:
    return TreeParallelExecutor({**FAST, **params}, RunContext(output_dir=tmp_path, devices=list(devices)))


def test_the_registered_loader_gives_this_executor():
    cls = _tree_parallel_executor()
    assert cls is TreeParallelExecutor and issubclass(cls, Executor)


def test_results_are_identical_with_one_or_two_workers(tmp_path, trees):
    jobs = _jobs()
    by_workers = {}
    for workers in (1, 2):
        seen = []
        with _executor(tmp_path, tree_parallel_workers=workers) as ex:
            results = ex.run_batch(jobs, on_result=seen.append)
        assert len(results) == len(seen) == 18  # every fold of every job, each reported once
        assert all(r.status == "ok" for r in results), [r.error for r in results if r.error]
        by_workers[workers] = [(r.model_type, r.trial_number, r.fold_idx, r.score) for r in results]
    assert by_workers[1] == by_workers[2]
    # Returned in batch order (job, then fold), whatever order the folds finished in.
    assert [(m, t, f) for m, t, f, _ in by_workers[2]] == [(j.model_type, j.trial_number, f)
                                                          for j in jobs for f in range(3)]


def test_a_cpu_trials_folds_train_at_once_on_the_free_workers_with_the_serial_results(tmp_path, trees):
    """A batch's last CPU trial must not run its folds one after another on one worker while the
    others idle: its folds go out one at a time, to every free worker, and still give the serial fits."""
    job = _jobs(("lightgbm",), trials=1)[0]
    with _executor(tmp_path, tree_parallel_workers=2) as ex:
        results = ex.run_batch([job])
    assert [r.fold_idx for r in results] == [0, 1, 2]
    assert {r.info["slot"] for r in results} == {0, 1}  # both workers took folds of the one trial
    reference = run_trial(job, FitSettings(FAST["tree_rounds"], FAST["tree_early_stopping_rounds"], threads=1))
    assert [r.score for r in results] == [r.score for r in reference]


def test_workers_are_fresh_interpreters_that_never_import_torch(tmp_path, trees):
    with _executor(tmp_path, tree_parallel_workers=2) as ex:
        ex.run_batch(_jobs())
        infos = ex.pool.ping()
    assert len(infos) == 2
    for info in infos:
        assert "torch" not in info["modules"]
        assert "pytest" not in info["modules"]  # spawned, not forked from this pytest process
    assert {m for info in infos for m in info["modules"]} == {"catboost", "lightgbm", "xgboost"}


def test_each_worker_is_pinned_to_its_gpu_and_cores_before_it_starts(tmp_path, trees):
    with _executor(tmp_path, devices=[0], tree_parallel_workers=2, tree_device="gpu") as ex:
        infos = sorted(ex.pool.ping(), key=lambda info: info["gpu"] is None)
    gpu_worker, cpu_worker = infos
    assert gpu_worker["gpu"] == 0 and gpu_worker["cuda_visible_devices"] == "0"
    assert cpu_worker["gpu"] is None and cpu_worker["cuda_visible_devices"] == ""  # sees no GPU at all
    for worker in infos:  # as many library threads as cores in its share, whatever this machine has
        assert worker["threads"] == len(worker["affinity"]) >= 1
    assert set(gpu_worker["affinity"]).isdisjoint(cpu_worker["affinity"])


def test_gpu_trials_go_to_the_gpu_worker_and_lightgbm_to_cpu_threads(tmp_path, trees):
    # No GPU here: CatBoost's GPU fits fail fast, which is enough to see where each trial was sent.
    jobs = _jobs(("catboost", "lightgbm"), trials=3)
    with _executor(tmp_path, devices=[0], tree_parallel_workers=2, tree_device="gpu") as ex:
        results = ex.run_batch(jobs)
    catboost = [r for r in results if r.model_type == "catboost"]
    lightgbm = [r for r in results if r.model_type == "lightgbm"]
    assert all(r.info["worker_gpu"] == 0 and r.info["device"] == "gpu" for r in catboost)
    assert all(r.status == "ok" and r.info["device"] == "cpu" for r in lightgbm)
    assert any(r.info["worker_gpu"] is None for r in lightgbm)  # the CPU worker ran LightGBM meanwhile


def test_the_pool_lives_across_batches(tmp_path, trees):
    with _executor(tmp_path, tree_parallel_workers=2) as ex:
        ex.run_batch(_jobs(("lightgbm",), trials=1))
        pids = sorted(ex.pool.worker_pids())
        ex.run_batch(_jobs(("xgboost",), trials=1))
        assert sorted(ex.pool.worker_pids()) == pids
    assert ex._pool is None  # closed


def test_an_unknown_model_type_fails_its_folds_only(tmp_path, trees):
    jobs = [TrialJob("nn", 0, {}, DATA, 3, 11), *_jobs(("lightgbm",), trials=1)]
    with _executor(tmp_path) as ex:
        results = ex.run_batch(jobs)
    assert [r.status for r in results] == ["fail"] * 3 + ["ok"] * 3
    assert "cannot train model type 'nn'" in results[0].error


def test_tree_device_gpu_without_a_gpu_is_refused(tmp_path):
    with pytest.raises(ExecutorError, match="no GPU"):
        _executor(tmp_path, tree_device="gpu")


@pytest.mark.parametrize("value", [0, -0.5, 1.5, "big", True, None])
def test_catboost_gpu_ram_part_is_auto_or_a_share_of_the_gpu(tmp_path, value):
    assert _executor(tmp_path).settings.catboost_gpu_ram_part is None  # "auto", the default
    assert _executor(tmp_path, catboost_gpu_ram_part=1).settings.catboost_gpu_ram_part == 1.0
    with pytest.raises(ExecutorError, match=r'catboost_gpu_ram_part: .* is not valid: expected "auto" or a number in \(0, 1\]'):
        _executor(tmp_path, catboost_gpu_ram_part=value)


@pytest.mark.parametrize("name", ["xgboost_gpu_fold_threads", "tree_gpu_worker_cores"])
@pytest.mark.parametrize("value", [0, -2, 2.5, "many", True, None])
def test_fold_threads_and_gpu_worker_cores_are_auto_or_a_count(tmp_path, name, value):
    with pytest.raises(ExecutorError, match=rf'{name}: .* is not valid: expected "auto" or an integer >= 1'):
        _executor(tmp_path, **{name: value})


@pytest.mark.parametrize("value", [0, 1, "true", None])
def test_xgboost_gpu_async_pool_is_true_or_false(tmp_path, value):
    assert _executor(tmp_path).settings.xgboost_gpu_async_pool is True
    assert _executor(tmp_path, xgboost_gpu_async_pool=False).settings.xgboost_gpu_async_pool is False
    with pytest.raises(ExecutorError, match=r"xgboost_gpu_async_pool: .* is not of type 'boolean'"):
        _executor(tmp_path, xgboost_gpu_async_pool=value)


def test_a_pool_cuda_refused_is_logged_once_per_executor(tmp_path, caplog):
    # Where CUDA refuses XGBoost its pool (a device without stream-ordered allocation), the fits go on
    # with cudaMalloc and say why in their info; the operator hears of it once, not once per fold.
    from watcher_plugins.records import FoldResult

    ex = _executor(tmp_path, devices=[0])
    refused = [FoldResult(0, k, "xgboost", 0.5, 1.0, "ok", info={"xgboost_async_pool": False,
                                                                  "xgboost_async_pool_error": "not supported"})
               for k in range(3)]
    ex._warn_if_pool_refused([FoldResult(0, 0, "xgboost", 0.5, 1.0, "ok", info={"xgboost_async_pool": True})])
    assert not caplog.records
    ex._warn_if_pool_refused(refused)
    ex._warn_if_pool_refused(refused)
    assert [r.getMessage() for r in caplog.records] == [
        "xgboost_gpu_async_pool: CUDA refused XGBoost its stream-ordered memory pool (not supported); GPU "
        "XGBoost trains with cudaMalloc: same results, folds at once slower"]


def test_auto_trains_xgboost_folds_at_once_only_when_the_pool_is_parallel(tmp_path):
    # Serial (1 worker) is the reference and stays one fold at a time.
    assert _executor(tmp_path, devices=[0]).settings.xgboost_gpu_fold_threads == 1
    assert _executor(tmp_path, devices=[0], tree_parallel_workers=2).settings.xgboost_gpu_fold_threads == 5
    explicit = _executor(tmp_path, devices=[0], xgboost_gpu_fold_threads=3)
    assert explicit.settings.xgboost_gpu_fold_threads == 3
    # Two workers asked, capped to one by a single core: one worker is serial, whatever was asked.
    capped = TreeParallelExecutor({**FAST, "tree_parallel_workers": 2},
                                  RunContext(output_dir=tmp_path, devices=[0], cpu_count=1))
    assert len(capped.placements) == 1 and capped.settings.xgboost_gpu_fold_threads == 1


def test_the_gpu_worker_gets_a_core_per_fold_thread_and_the_cpu_workers_the_rest(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tree_executor, "available_cores", lambda limit=None: list(range(16))[:limit])

    def shares(**params):
        ex = TreeParallelExecutor({**FAST, **params}, RunContext(output_dir=tmp_path, devices=[0], cpu_count=16))
        return [(p.gpu, p.threads) for p in ex.placements]

    # auto: 5 fold threads + 1 for the GPU worker; 3 CPU workers with 2 cores, 4 with 1.
    assert shares(tree_parallel_workers=8) == [(0, 6)] + [(None, 2)] * 3 + [(None, 1)] * 4
    # Folds one at a time: equal shares, as before.
    assert shares(tree_parallel_workers=8, xgboost_gpu_fold_threads=1) == [(0, 2)] + [(None, 2)] * 7
    # As many workers as cores: nobody loses a place to the GPU worker.
    assert shares(tree_parallel_workers=16) == [(0, 1)] + [(None, 1)] * 15
    assert shares(tree_parallel_workers=4, tree_gpu_worker_cores=10) == [(0, 10), (None, 2), (None, 2), (None, 2)]
    assert not caplog.records
    # Asked for more than the CPU workers can spare: as many as they can, with a warning that says why.
    assert shares(tree_parallel_workers=8, tree_gpu_worker_cores=12) == [(0, 9)] + [(None, 1)] * 7
    assert "tree_gpu_worker_cores=12: GPU workers get 9 cores, so that each of the 7 CPU workers keeps one" \
        in caplog.text


def test_auto_workers_are_the_gpu_workers_then_a_one_core_cpu_worker_on_every_core_left(tmp_path, monkeypatch,
                                                                                        caplog):
    monkeypatch.setattr(tree_executor, "available_cores", lambda limit=None: list(range(64))[:limit])

    def plan(devices, cpu_count, **params):
        ex = TreeParallelExecutor({**FAST, "tree_parallel_workers": "auto", **params},
                                  RunContext(output_dir=tmp_path, devices=devices, cpu_count=cpu_count))
        return [(p.gpu, p.threads) for p in ex.placements], ex.settings.xgboost_gpu_fold_threads

    # The plans measured fastest on H200s: 11 workers on one GPU and 16 cores, 22 on two and 32.
    assert plan([0], 16) == ([(0, 6)] + [(None, 1)] * 10, 5)
    assert plan([0, 1], 32) == ([(0, 6), (1, 6)] + [(None, 1)] * 20, 5)
    assert plan([0], 16, xgboost_per_gpu=2) == ([(0, 4), (0, 4)] + [(None, 1)] * 8, 5)
    assert plan([], 4) == ([(None, 1)] * 4, 5)
    assert plan([0], 16, tree_device="cpu") == ([(None, 1)] * 16, 5)
    assert plan([0], 1) == ([(0, 1)], 1)  # room for one worker: serial, folds one at a time
    # Every GPU keeps its worker, however few the cores or however many each GPU worker asks for.
    assert plan([0, 1], 1) == ([(0, 1), (1, 1)], 5)
    assert plan([0, 1, 2, 3], 2) == ([(0, 1), (1, 1), (2, 1), (3, 1)], 5)
    assert not caplog.records  # nothing was capped: auto asks for what fits
    assert plan([0, 1], 16, tree_gpu_worker_cores=9) == ([(0, 8), (1, 8)], 5)
    assert "tree_gpu_worker_cores=9: GPU workers get 8 cores, their share of the 16 cores" in caplog.text


def test_auto_plans_no_more_workers_than_host_memory_holds(tmp_path, monkeypatch, caplog):
    # Each worker keeps its own copy of the data and its per-fold datasets: on a many-core host with a
    # large dataset, one worker per core would run the host out of memory.
    from watcher_plugins.tree_parallel.placement import worker_memory_bytes

    monkeypatch.setattr(tree_executor, "available_cores", lambda limit=None: list(range(16))[:limit])
    rows, features = 2_000_000, 62
    gpu_each = worker_memory_bytes(rows, features, 5, lightgbm_only=False)
    lightgbm_each = worker_memory_bytes(rows, features, 5, lightgbm_only=True)

    def plan(room, devices=(), **params):
        monkeypatch.setattr(tree_executor, "available_memory", lambda: room)
        ex = TreeParallelExecutor({**FAST, "tree_parallel_workers": "auto", **params},
                                  RunContext(output_dir=tmp_path, devices=list(devices), cpu_count=16,
                                             data_shape=(rows, features), folds=5))
        return [(p.gpu, p.threads) for p in ex.placements], ex.settings.xgboost_gpu_fold_threads

    share = tree_executor.MEMORY_SHARE
    # Room for the GPU worker and two and a half LightGBM-only CPU workers: two, on the cores left.
    assert plan((gpu_each + 2.5 * lightgbm_each) / share, [0]) == ([(0, 6), (None, 5), (None, 5)], 5)
    assert "tree_parallel_workers auto: 3 worker(s), not 11, so that they fit in 80% of the" in caplog.text
    assert (f"2000000 rows x 62 features, and per-fold datasets: about {gpu_each / 1e9:.1f} GB a GPU worker, "
            f"{lightgbm_each / 1e9:.1f} GB a CPU worker") in caplog.text
    # Without GPUs every worker may train all three libraries.
    assert plan(3.5 * gpu_each / share) == ([(None, 6), (None, 5), (None, 5)], 5)
    # Room for one: serial, the reference (all the cores, folds one at a time).
    caplog.clear()
    assert plan(1.5 * gpu_each / share) == ([(None, 16)], 1)
    assert "1 worker(s), not 16" in caplog.text and "even its" not in caplog.text
    # A GPU's extra XGBoost workers (xgboost_per_gpu) are no more needed than CPU workers: room for two.
    assert plan(2.5 * gpu_each / share, [0], xgboost_per_gpu=4)[0] == [(0, 8), (0, 8)]
    assert "2 worker(s), not 12" in caplog.text
    # Every GPU keeps its worker, whatever the memory says (GPU fits differ from CPU ones); so does the
    # serial worker. A warning says they may not fit.
    caplog.clear()
    assert plan(GB, [0, 1]) == ([(0, 8), (1, 8)], 5)
    assert "even its 2 worker(s) that no plan does without may need about" in caplog.text
    assert plan(GB) == ([(None, 16)], 1)
    assert "even its 1 worker(s)" in caplog.text
    # Enough room, or data the host did not describe: auto's plan is the cores'.
    caplog.clear()
    assert plan(12 * lightgbm_each / share, [0])[0] == [(0, 6)] + [(None, 1)] * 10
    monkeypatch.setattr(tree_executor, "available_memory", lambda: GB)
    ex = TreeParallelExecutor({"tree_parallel_workers": "auto"}, RunContext(output_dir=tmp_path, devices=[],
                                                                            cpu_count=16))
    assert len(ex.placements) == 16 and not caplog.records


def test_an_explicit_worker_count_past_host_memory_is_kept_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tree_executor, "available_cores", lambda limit=None: list(range(16))[:limit])
    monkeypatch.setattr(tree_executor, "available_memory", lambda: 4 * GB)
    context = RunContext(output_dir=tmp_path, devices=[], cpu_count=16, data_shape=(2_000_000, 62), folds=5)
    assert len(TreeParallelExecutor({**FAST, "tree_parallel_workers": 2}, context).placements) == 2
    assert "tree_parallel_workers=2: the workers may need about" in caplog.text
    assert "more than 80% of the 4.0 GB available" in caplog.text
    caplog.clear()
    # One worker (the default, serial) is the least there is: no advice to give.
    assert len(TreeParallelExecutor({**FAST, "tree_parallel_workers": 1}, context).placements) == 1
    assert not caplog.records
    small = RunContext(output_dir=tmp_path, devices=[], cpu_count=16, data_shape=(1500, 62), folds=5)
    assert len(TreeParallelExecutor({**FAST, "tree_parallel_workers": 4}, small).placements) == 4
    assert not caplog.records


@pytest.mark.parametrize("async_pool", [True, False])
def test_gpu_xgboost_folds_train_at_once_on_the_gpu_worker_only(tmp_path, trees, async_pool):
    # No GPU here: XGBoost's GPU fits fail (it finds no GPU), but each fold's result says how many
    # folds its worker trained at once (the GPU worker all 3 of an XGBoost trial, LightGBM one), and
    # its error whether the fit asked CUDA for its memory pool (xgboost_gpu_async_pool reached it).
    from watcher_plugins.tree_parallel.libraries import xgboost_has_async_pool

    jobs = _jobs(("xgboost", "lightgbm"), trials=2)
    with _executor(tmp_path, devices=[0], tree_parallel_workers=2, tree_device="gpu",
                   xgboost_gpu_async_pool=async_pool) as ex:
        results = ex.run_batch(jobs)
    xgboost = [r for r in results if r.model_type == "xgboost"]
    assert all(r.info["worker_gpu"] == 0 and r.info["concurrent_folds"] == 3 for r in xgboost)
    assert all(r.status == "fail" and "XGBoost found no visible GPU" in r.error for r in xgboost)
    asked = async_pool and xgboost_has_async_pool()
    assert all(("CUDA refused its memory pool" in r.error) is asked for r in xgboost)
    lightgbm = [r for r in results if r.model_type == "lightgbm"]
    assert {r.info["concurrent_folds"] for r in lightgbm} == {1}
    assert not any("xgboost_async_pool" in r.info for r in lightgbm)
    assert [(r.model_type, r.trial_number, r.fold_idx) for r in results] == [
        (j.model_type, j.trial_number, f) for j in jobs for f in range(3)]


def test_tree_device_cpu_ignores_the_gpus(tmp_path):
    ex = _executor(tmp_path, devices=[0, 1], tree_parallel_workers=3, tree_device="cpu")
    assert all(p.gpu is None for p in ex.placements)


def test_a_batch_returns_with_every_trial_ended_on_its_worker(tmp_path, trees):
    """run_batch returns once every worker has said "done", not on the last fold result: no trial of a
    finished batch is still assigned (on its GPU, for the sharing rules) when the next batch starts."""
    with _executor(tmp_path, tree_parallel_workers=2) as ex:
        for _ in range(2):
            results = ex.run_batch(_jobs(("lightgbm",), trials=3))
            assert all(r.status == "ok" for r in results)
            assert ex.pool.busy_workers() == []


def test_a_gpu_worker_whose_fit_failed_is_replaced_before_the_next_trial(tmp_path, trees):
    # A failed GPU fit can leave its process's CUDA state broken (CatBoost: "State == nullptr" on every
    # later fit). No GPU here, so every GPU fit fails: each trial gets a fresh worker, every fold its own
    # fit's error (not a crash, and no retry: the trial was not lost, it failed).
    jobs = _jobs(("catboost", "xgboost"), trials=2)
    with _executor(tmp_path, devices=[0], tree_parallel_workers=1, tree_device="gpu") as ex:
        results = ex.run_batch(jobs)
        retirements, restarts = ex.pool.retirements, ex.pool.restarts
    pids = [{r.info["pid"] for r in results if (r.model_type, r.trial_number) == (j.model_type, j.trial_number)}
            for j in jobs]
    assert all(len(p) == 1 for p in pids) and len(set.union(*pids)) == len(jobs)
    assert retirements >= len(jobs) - 1 and restarts == 0
    assert all(r.status == "fail" and "gave up" not in r.error for r in results), [r.error for r in results]
    # Each CatBoost trial's first fold meets a fresh process: its error is the real cause.
    assert all("State == nullptr" not in r.error for r in results if r.model_type == "catboost" and r.fold_idx == 0)


def test_the_memory_plan_uses_the_runs_folds_from_the_context(tmp_path):
    # The step's folds come through the run context (the schema's 3 by default), not a fallback of the executor's.
    from watcher_plugins.tree_parallel.placement import worker_memory_bytes

    def each(folds):
        context = RunContext(output_dir=tmp_path, devices=[], cpu_count=2, data_shape=(50_000, 62), folds=folds)
        return TreeParallelExecutor(FAST, context)._memory_each(has_gpus=False)

    assert each(3)[1] == worker_memory_bytes(50_000, 62, 3, lightgbm_only=False)
    assert each(10)[1] == worker_memory_bytes(50_000, 62, 10, lightgbm_only=False) > each(3)[1]
    assert each(None) is None  # unknown before the first job: no estimate rather than a guess
