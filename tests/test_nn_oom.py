"""OOM recovery, with out-of-memory errors injected at a chosen concurrency (on CPU, as on a GPU):
OOM at k retries the fits not yet done at k/2; OOM at 1 ends a fit with status "oom"; every fit gets
exactly one outcome. (The worker-level OOM and fatal-error tests are in test_nn_worker.py.)"""

from __future__ import annotations

import pytest
import torch

from watcher_plugins.faults import Faults
from watcher_plugins.nn_batch.device_data import DeviceDatasetCache
from watcher_plugins.nn_batch.fused import FusedTrainer
from watcher_plugins.nn_batch.oom import train_with_oom_recovery
from watcher_plugins.nn_batch.protocol import FitJob
from watcher_plugins.nn_batch.serial import SerialTrainer
from watcher_plugins.nn_batch.streams import StreamsTrainer
from watcher_plugins.nn_batch.training import FitTask, TrainSettings
from watcher_plugins.records import STATUS_OK, STATUS_OOM, DataRef

CPU = torch.device("cpu")
DATA = DataRef(embedded="survivors", rows=400)
SETTINGS = TrainSettings(max_epochs=20, patience=4)


def make_tasks(n: int) -> list[FitTask]:
    data = DeviceDatasetCache(CPU).get(DATA)
    return [FitTask.build(FitJob(t, t % 2, 2, 5, (32, 16), 1e-2, 0.0, 0.1 * (t % 2), DATA), data) for t in range(n)]


def run(trainer, tasks, k):
    got = []
    report = train_with_oom_recovery(trainer, tasks, k, got.append)
    return report, got


@pytest.mark.parametrize("trainer_cls", [FusedTrainer, StreamsTrainer])
def test_oom_at_k_retries_at_half_with_one_outcome_per_fit(trainer_cls):
    tasks = make_tasks(8)
    seen = []

    def hook(pack):
        seen.append(len(pack))
        Faults(nn_oom_at_concurrency=4).before_pack(pack)

    report, got = run(trainer_cls(SETTINGS, CPU, hook), tasks, 8)
    assert seen[:3] == [8, 4, 2]  # 8 -> OOM -> 4 -> OOM -> 2 fits
    assert report.oom_retries == 2 and report.n_concurrent_used == 2 and report.oom_failed == 0
    assert sorted(o.key for o in got) == sorted(t.key for t in tasks)  # exactly one outcome per fit
    _, reference = run(SerialTrainer(SETTINGS, CPU), make_tasks(8), 1)
    expected = {o.key: o.score for o in reference}
    assert all(o.status == STATUS_OK and abs(o.score - expected[o.key]) < 1e-4 for o in got)


def test_oom_at_concurrency_one_ends_each_fit_as_oom():
    tasks = make_tasks(3)
    report, got = run(FusedTrainer(SETTINGS, CPU, Faults(nn_oom_at_concurrency=1).before_pack), tasks, 4)
    assert sorted(o.key for o in got) == sorted(t.key for t in tasks)
    assert all(o.status == STATUS_OOM and o.score is None and "out of memory" in o.error for o in got)
    assert report.oom_failed == 3 and report.n_concurrent_used == 1


def test_only_the_fit_that_does_not_fit_alone_is_oom():
    tasks = make_tasks(4)

    def hook(pack):  # trial 2 is too big even alone; the others fit in pairs
        if len(pack) > 2 or any(task.key[0] == 2 for task in pack):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    _, got = run(FusedTrainer(SETTINGS, CPU, hook), tasks, 4)
    status = {o.key[0]: o.status for o in got}
    assert status == {0: STATUS_OK, 1: STATUS_OK, 2: STATUS_OOM, 3: STATUS_OK}


def test_a_fit_too_big_even_alone_leaves_the_others_their_concurrency():
    # Trial 0 is the only one of its depth, so it has a pack of its own, and out of memory even there.
    data = DeviceDatasetCache(CPU).get(DATA)
    tasks = [FitTask.build(FitJob(t, 0, 2, 5, (32, 16, 8) if t == 0 else (32, 16), 1e-2, 0.0, 0.0, DATA), data)
             for t in range(7)]
    sizes = []

    def hook(pack):
        sizes.append(len(pack))
        if any(task.key[0] == 0 for task in pack):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    report, got = run(FusedTrainer(SETTINGS, CPU, hook), tasks, 4)
    assert {o.key[0]: o.status for o in got} == {0: STATUS_OOM, **dict.fromkeys(range(1, 7), STATUS_OK)}
    assert sizes == [1, 4, 2]  # the other six still share packs of up to 4
    assert report.oom_failed == 1 and report.oom_retries == 0 and report.n_concurrent_used == 4


def test_the_streams_trainer_shows_the_pack_hook_every_fit_it_starts():
    # Fits take the streams as others end: each start is a new set of fits training together, which the
    # hook (fault injection, OOM at a concurrency) must see, not only the first n_concurrent.
    seen = []
    tasks = make_tasks(5)
    StreamsTrainer(SETTINGS, CPU, lambda pack: seen.append(sorted(t.key[0] for t in pack))).train(
        tasks, 2, lambda outcome: None)
    assert seen[0] == [0, 1]
    assert sorted({trial for pack in seen for trial in pack}) == [0, 1, 2, 3, 4]
    assert all(len(pack) <= 2 for pack in seen)
