"""Worker placement: one GPU worker per GPU, disjoint core shares, never more workers than cores."""

from __future__ import annotations

import pytest

from watcher_plugins.tree_parallel.placement import WorkerPlacement, auto_gpu_worker_cores, plan_placements


def _all_cores(placements):
    return [c for p in placements for c in p.cores]


def test_serial_is_one_worker_with_every_core_and_the_first_gpu():
    (only,) = plan_placements(1, [3, 5], range(16))
    assert only.gpu == 3 and only.cores == tuple(range(16)) and only.threads == 16


def test_gpu_workers_first_then_cpu_workers_with_disjoint_core_shares():
    placements = plan_placements(8, [0, 1], range(16))
    assert [p.gpu for p in placements] == [0, 1, None, None, None, None, None, None]
    cores = _all_cores(placements)
    assert sorted(cores) == list(range(16)) and len(set(cores)) == 16  # every core used once
    assert {p.threads for p in placements} == {2}


def test_uneven_shares_differ_by_at_most_one_core():
    placements = plan_placements(3, [], range(8))
    assert [p.threads for p in placements] == [3, 3, 2]
    assert all(p.gpu is None for p in placements)


def test_workers_are_capped_so_that_cores_are_never_oversubscribed():
    placements = plan_placements(10, [0], [0, 1, 2, 3])
    assert len(placements) == 4 and [p.gpu for p in placements] == [0, None, None, None]
    assert sorted(_all_cores(placements)) == [0, 1, 2, 3]


def test_more_workers_than_gpus_on_a_gpu_only_plan_use_one_worker_per_gpu():
    placements = plan_placements(2, [0, 1, 2], range(4))
    assert [p.gpu for p in placements] == [0, 1]  # a GPU is never shared, an extra GPU may stay idle


def test_placement_round_trips_through_json():
    p = WorkerPlacement(slot=2, gpu=1, cores=(4, 5, 6, 9))
    assert WorkerPlacement.from_json(p.to_json()) == p
    assert p.describe() == "worker 2 (GPU 1, cores 4-6,9)"
    unpinned = WorkerPlacement(slot=0, gpu=None, cores=(0, 1), pinned=False)
    assert WorkerPlacement.from_json(unpinned.to_json()) == unpinned
    assert unpinned.describe() == "worker 0 (CPU, 2 threads, unpinned)"


def test_zero_workers_is_refused():
    with pytest.raises(ValueError, match="tree_parallel_workers"):
        plan_placements(0, [], range(4))


def test_xgboost_per_gpu_places_that_many_workers_on_each_gpu_round_robin():
    placements = plan_placements(8, [0, 1], range(16), xgboost_per_gpu=3)
    assert [p.gpu for p in placements] == [0, 1, 0, 1, 0, 1, None, None]
    cores = _all_cores(placements)
    assert sorted(cores) == list(range(16)) and {p.threads for p in placements} == {2}  # a share each


def test_xgboost_per_gpu_1_keeps_one_worker_per_gpu():
    for workers in range(1, 12):
        for gpus in ([], [0], [0, 1], [2, 3, 4]):
            placements = plan_placements(workers, gpus, range(8), xgboost_per_gpu=1)
            assert [p.gpu for p in placements if p.gpu is not None] == list(gpus[:workers])


def test_gpu_workers_are_bounded_by_the_workers_asked_for_and_by_xgboost_per_gpu():
    assert [p.gpu for p in plan_placements(3, [0], range(16), xgboost_per_gpu=4)] == [0, 0, 0]
    assert [p.gpu for p in plan_placements(10, [0], range(16), xgboost_per_gpu=4)] == [0] * 4 + [None] * 6


def test_gpu_sharing_workers_never_oversubscribe_the_cores():
    placements = plan_placements(4, [0], [0, 1], xgboost_per_gpu=4)
    assert [p.gpu for p in placements] == [0, 0] and sorted(_all_cores(placements)) == [0, 1]
    # Fewer cores than GPUs: each GPU still gets its one worker (sharing cores, as before), no more.
    assert [p.gpu for p in plan_placements(6, [0, 1, 2], [0, 1], xgboost_per_gpu=2)] == [0, 1, 2]


def test_zero_xgboost_per_gpu_is_refused():
    with pytest.raises(ValueError, match="xgboost_per_gpu"):
        plan_placements(2, [0], range(4), xgboost_per_gpu=0)


def test_gpu_worker_cores_gives_each_gpu_worker_that_many_and_the_cpu_workers_the_rest():
    placements = plan_placements(8, [0], range(16), gpu_worker_cores=6)
    assert [(p.gpu, p.threads) for p in placements] == [(0, 6)] + [(None, 2)] * 3 + [(None, 1)] * 4
    assert sorted(_all_cores(placements)) == list(range(16))  # disjoint, every core used
    two = plan_placements(8, [0, 1], range(32), gpu_worker_cores=6)
    assert [p.threads for p in two if p.gpu is not None] == [6, 6] and sum(p.threads for p in two) == 32


def test_gpu_worker_cores_never_costs_a_worker_its_place():
    # Already more than asked: the equal share stands.
    assert [p.threads for p in plan_placements(2, [0], range(16), gpu_worker_cores=4)] == [8, 8]
    # A serial plan is one worker with every core.
    assert [p.threads for p in plan_placements(1, [0], range(16), gpu_worker_cores=6)] == [16]
    # As many workers as cores: every worker keeps its one core, the GPU worker gets no more.
    assert [p.threads for p in plan_placements(16, [0], range(16), gpu_worker_cores=6)] == [1] * 16
    # Only what the CPU workers can spare: 7 of them need 7 of 9 cores.
    assert [p.threads for p in plan_placements(8, [0], range(9), gpu_worker_cores=6)] == [2] + [1] * 7
    # Shared by four GPU workers: 16 cores less the 4 CPU workers' ones, 3 each.
    four = plan_placements(8, [0], range(16), xgboost_per_gpu=4, gpu_worker_cores=6)
    assert [(p.gpu, p.threads) for p in four] == [(0, 3)] * 4 + [(None, 1)] * 4
    assert [(p.gpu, p.cores) for p in plan_placements(3, [0], range(2), gpu_worker_cores=6)] == [(0, (0,)), (None, (1,))]
    with pytest.raises(ValueError, match="gpu_worker_cores"):
        plan_placements(4, [0], range(8), gpu_worker_cores=0)


def test_auto_gpu_worker_cores_is_a_core_per_fold_thread_plus_one_within_half_the_cores():
    assert auto_gpu_worker_cores(5, 16, 1) == 6
    assert auto_gpu_worker_cores(5, 32, 2) == 6
    assert auto_gpu_worker_cores(5, 8, 1) == 4  # half of 8
    assert auto_gpu_worker_cores(5, 2, 1) == 1
    assert auto_gpu_worker_cores(1, 16, 1) is None  # folds one at a time: equal shares
    assert auto_gpu_worker_cores(5, 16, 0) is None  # no GPU worker
