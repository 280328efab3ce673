"""nn_batch on a CUDA GPU (skipped without one): packs compute what a plain nn.Sequential + Adam
computes, the kernels compute their reference exactly where exact sums allow, a captured epoch replays
the eager one bit for bit, the executor's worker holds the GPU lease, and OOM recovery really frees
device memory. The bit-equality of a fit across packs and trainers: test_nn_gpu_invariance.py."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from nn_cases import fit_tasks  # noqa: E402
from test_nn_trainers import (  # noqa: E402,F401 - the CPU file's tests, collected here with this file's device
    test_packs_are_as_close_to_the_plain_reference_as_it_is_to_itself_over_seeds,
    test_packs_compute_what_a_plain_sequential_and_adam_computes,
)

from watcher_plugins.errors import LeaseTimeout  # noqa: E402
from watcher_plugins.executor import RunContext  # noqa: E402
from watcher_plugins.faults import ENV, Faults, encode  # noqa: E402
from watcher_plugins.lease import GpuLease  # noqa: E402
from watcher_plugins.nn_batch import dropout as hashing  # noqa: E402
from watcher_plugins.nn_batch import pack_kernels as kernels  # noqa: E402
from watcher_plugins.nn_batch.device_data import DeviceDatasetCache  # noqa: E402
from watcher_plugins.nn_batch.fused import FusedTrainer  # noqa: E402
from watcher_plugins.nn_batch.oom import train_with_oom_recovery  # noqa: E402
from watcher_plugins.nn_batch.pack import TritonPack  # noqa: E402
from watcher_plugins.nn_batch.protocol import FitJob  # noqa: E402
from watcher_plugins.nn_batch.training import FitTask, TrainSettings, precision_context  # noqa: E402
from watcher_plugins.records import STATUS_OK, DataRef, TrialJob  # noqa: E402

CUDA = torch.device("cuda:0")
#: The graph, OOM and worker tests' data: large enough for packs that compact and for a real OOM to matter.
GRAPH_DATA = DataRef(embedded="survivors", rows=4000)


@pytest.fixture(scope="module")
def device():
    return CUDA


@pytest.fixture(scope="module")
def cache():
    return DeviceDatasetCache(CUDA)


def run(trainer, fits, k):
    got = {}
    with precision_context(trainer.settings.precision, CUDA):
        trainer.train(fits, k, lambda o: got.__setitem__(o.key, o))
    return got


def train_fused(cache, precision, **trainer_args):
    return train_fused_settings(cache, TrainSettings(80, 10, precision), **trainer_args)


def train_fused_settings(cache, settings, **trainer_args):
    trainer = FusedTrainer(settings, CUDA, **trainer_args)
    return trainer, run(trainer, fit_tasks(cache, GRAPH_DATA), 8)


def test_oom_recovery_frees_the_failed_packs_memory(cache):
    # what the process keeps once and for all (the CUDA-graph warm-up stream's cuBLAS workspaces) is
    # allocated before the measurement: it is not the failed pack's
    train_fused(cache, "fp32", cuda_graphs=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(CUDA)
    seen = []

    def oom_on_first_step(pack):  # a real allocation, then an OOM at concurrency >= 4
        seen.append(len(pack))
        if len(pack) >= 4:
            _hog = torch.empty(256 * 1024 * 1024, device=CUDA)  # noqa: F841 - held by this frame
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    got = []
    trainer = FusedTrainer(TrainSettings(20, 5), CUDA, oom_on_first_step)
    report = train_with_oom_recovery(trainer, fit_tasks(cache, GRAPH_DATA)[:6], 6, got.append)
    torch.cuda.synchronize()
    assert seen[0] == 4 and max(seen[1:]) == 2  # the 3-layer pack of 4 failed; retried in packs of 2
    assert report.oom_retries >= 1 and len(got) == 6 and all(o.status == STATUS_OK for o in got)
    assert torch.cuda.memory_allocated(CUDA) - before < 64 * 1024 * 1024


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_pack_replaying_its_captured_epoch_computes_what_the_eager_pack_does(cache, precision):
    eager_trainer, eager = train_fused(cache, precision, cuda_graphs=False)
    graphed_trainer, graphed = train_fused(cache, precision)
    assert eager_trainer.graph_captures == 0
    # every pack captured once, and again after each compaction (new shapes): both paths ran
    assert graphed_trainer.compactions >= 1
    assert graphed_trainer.graph_captures == len(graphed_trainer.pack_sizes) + graphed_trainer.compactions
    for key, ref in eager.items():
        assert ref.status == STATUS_OK
        assert (graphed[key].score, graphed[key].best_epoch, graphed[key].epochs) == (ref.score, ref.best_epoch, ref.epochs)


def _settled_memory() -> tuple[int, int]:
    """Bytes allocated and reserved once the cache has returned what nothing holds."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(CUDA), torch.cuda.memory_reserved(CUDA)


def test_capturing_packs_again_and_again_keeps_no_memory(cache):
    train_fused(cache, "fp32")
    allocated, reserved = _settled_memory()
    trainer, _ = train_fused(cache, "fp32")
    assert trainer.graph_captures >= 3
    # reserved too: a graph kept alive holds its memory pool, which memory_allocated does not show
    after = _settled_memory()
    assert after[0] - allocated < 1024 * 1024 and after[1] - reserved < 1024 * 1024


def test_a_graphed_packs_peak_reserved_memory_stays_near_the_eager_packs():
    # the VRAM budget is calibrated on eager epochs: a captured pack must fit in what they measured
    full = DataRef(embedded="survivors", rows=98_784)
    big = DeviceDatasetCache(CUDA).get(full)
    specs = [FitJob(t, t % 3, 3, 11, (512, 256, 128), 1e-3, 0.0, 0.1, full) for t in range(6)]

    def peak_reserved(graphs: bool) -> int:
        _settled_memory()
        torch.cuda.reset_peak_memory_stats(CUDA)
        trainer = FusedTrainer(TrainSettings(6, 10), CUDA, cuda_graphs=graphs)
        with precision_context("fp32", CUDA):
            trainer.train([FitTask.build(job, big) for job in specs], 6, lambda o: None)
        assert trainer.graph_captures == (1 if graphs else 0)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_reserved(CUDA)

    eager = peak_reserved(False)
    assert peak_reserved(True) <= 1.15 * eager


@pytest.mark.parametrize("max_epochs", [2, 3])
def test_a_capture_is_made_only_where_an_epoch_replays_it(cache, max_epochs):
    # 2 epochs: the first is the warm-up, the last takes no step: nothing to replay. 3: one replay each.
    trainer, got = train_fused_settings(cache, TrainSettings(max_epochs, 10))
    assert trainer.graph_captures == (0 if max_epochs == 2 else len(trainer.pack_sizes))
    assert all(o.status == STATUS_OK for o in got.values())


def test_a_pack_whose_capture_fails_trains_on_without_a_graph(cache, monkeypatch, caplog):
    # A host sync inside the epoch's work is not allowed while a stream is captured: the capture fails
    # midway, for real, and the pack trains on eagerly with the same numbers.
    work = TritonPack._epoch_work

    def with_a_host_sync(pack, stepping):
        work(pack, stepping)
        pack.val_loss.sum().item()

    eager_trainer, eager = train_fused(cache, "fp32", cuda_graphs=False)
    monkeypatch.setattr(TritonPack, "_epoch_work", with_a_host_sync)
    trainer, got = train_fused(cache, "fp32")
    assert trainer.graph_captures == 0 and "could not be captured as a CUDA graph" in caplog.text
    assert torch.cuda.current_stream(CUDA) == torch.cuda.default_stream(CUDA)
    # the log keeps no exception (with it, the failed capture's frames)
    assert not [arg for record in caplog.records for arg in record.args or () if isinstance(arg, BaseException)]
    assert {k: (o.score, o.best_epoch) for k, o in got.items()} == {k: (o.score, o.best_epoch) for k, o in eager.items()}


def test_executor_worker_holds_the_lease_and_trains_on_the_gpu(tmp_path):
    context = RunContext(output_dir=tmp_path, devices=[0], lease_dir=tmp_path / "leases")
    job = TrialJob("nn", 0, {"hidden_layers": [64, 32], "lr": 3e-3, "weight_decay": 0.0, "dropout": 0.1}, GRAPH_DATA, 3, 1)
    from watcher_plugins.nn_batch.executor import NNBatchExecutor

    with NNBatchExecutor({"nn_max_epochs": 30}, context) as executor:
        results = executor.run_batch([job])
        assert executor._slots[0].worker.info["device"].startswith("cuda:0")
        with pytest.raises(LeaseTimeout):
            GpuLease(0, tmp_path / "leases", timeout=0.2).acquire()
    assert [r.status for r in results] == [STATUS_OK] * 3
    with GpuLease(0, tmp_path / "leases", timeout=10):
        pass


def test_injected_oom_at_one_in_a_gpu_worker_is_status_oom(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, encode(nn_oom_at_concurrency=1))
    context = RunContext(output_dir=tmp_path, devices=[0], lease_dir=tmp_path / "leases")
    job = TrialJob("nn", 0, {"hidden_layers": [32], "lr": 3e-3}, GRAPH_DATA, 2, 1)
    from watcher_plugins.nn_batch.executor import NNBatchExecutor

    with NNBatchExecutor({"nn_max_epochs": 5}, context) as executor:
        results = executor.run_batch([job])
        assert executor._slots[0].worker.alive
    assert [r.status for r in results] == ["oom", "oom"]
    assert Faults.from_env().nn_oom_at_concurrency == 1


def _integer_inputs(gen, *shape, low=-3, high=4):
    """Small integers as floats: every product and sum of the kernels' is exact, in any order, so the
    kernels must equal the torch reference bit for bit (bf16 holds these integers exactly too)."""
    return torch.randint(low, high, shape, generator=gen, device=CUDA).float()


def _reference_factors(keys, ps, train, epoch, layer, width):
    """[N, R, width] dropout factors from dropout.py's host reference (1 on held-out rows)."""
    n, rows = train.shape
    draws = hashing.draws([hashing.layer_key(k, epoch, layer) for k in keys], torch.arange(rows, device=CUDA), width)
    kept = torch.tensor([hashing.keep_factor(p) for p in ps], device=CUDA).view(n, 1, 1)
    factors = torch.where(draws >= torch.tensor(ps, device=CUDA).view(n, 1, 1), kept, 0.0)
    return torch.where(train[:, :, None], factors, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_input_gradient_kernels_equal_the_reference_on_exact_sums(dtype):
    """A padded pack of fits of mixed widths and dropout rates (0 included), on fresh random integer
    inputs: the hidden layer's forward (relu, masks) and the gradient it passes down equal torch's bit
    for bit; padded units are never written; a NaN propagates through the ReLU as torch.relu's does."""
    gen = torch.Generator(device=CUDA).manual_seed(torch.seed() % 2**63)
    n, rows, k_pad, j_pad = 4, 3001, 40, 96
    k_real, j_real = [40, 17, 33, 8], [96, 50, 1, 70]
    ps = [0.0, 0.1, 0.35, 0.5]
    keys = [hashing.fit_key(int(torch.randint(0, 2**31, (1,)))) for _ in range(n)]
    train = torch.rand(n, rows, device=CUDA, generator=gen) < 0.8
    pack = kernels.PackDropout(keys, ps, train)
    a = _integer_inputs(gen, n, rows, k_pad).to(dtype)
    w = _integer_inputs(gen, n, k_pad, j_pad)
    b = _integer_inputs(gen, n, j_pad)
    a[1, 7, 0] = float("nan")
    out = torch.full((n, rows, j_pad), 12345.0, dtype=dtype, device=CUDA)  # poisoned: padding stays so
    epoch = torch.tensor([9], device=CUDA)
    kernels.hidden_forward(a, w, b, out, torch.tensor(k_real, dtype=torch.int32, device=CUDA),
                           torch.tensor(j_real, dtype=torch.int32, device=CUDA), pack, epoch, 2,
                           kernels.TILES["bf16" if dtype == torch.bfloat16 else "fp32"])
    factors = _reference_factors(keys, ps, train, 9, 2, j_pad)
    for m in range(n):
        z = a[m, :, : k_real[m]].float() @ w[m, : k_real[m], : j_real[m]] + b[m, : j_real[m]]
        want = (torch.relu(z) * factors[m, :, : j_real[m]]).to(dtype)
        got = out[m, :, : j_real[m]]
        assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any() == (m == 1)
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want)), m
        assert torch.all(out[m, :, j_real[m]:] == 12345.0)

    g = _integer_inputs(gen, n, rows, j_pad).to(dtype)
    below = torch.full((n, rows, k_pad), 12345.0, dtype=dtype, device=CUDA)
    acts = torch.relu(_integer_inputs(gen, n, rows, k_pad)).to(dtype)
    kernels.input_grad(g, w, acts, below, torch.tensor(k_real, dtype=torch.int32, device=CUDA),
                       torch.tensor(j_real, dtype=torch.int32, device=CUDA), pack, epoch, 1,
                       kernels.TILES["bf16" if dtype == torch.bfloat16 else "fp32"], output_layer=False)
    factors = _reference_factors(keys, ps, train, 9, 1, k_pad)
    for m in range(n):
        ga = (g[m, :, : j_real[m]].float() @ w[m, : k_real[m], : j_real[m]].T) * factors[m, :, : k_real[m]]
        want = torch.where(acts[m, :, : k_real[m]].float() <= 0, 0.0, ga).to(dtype)
        assert torch.equal(below[m, :, : k_real[m]], want), m
        assert torch.all(below[m, :, k_real[m]:] == 12345.0)


def test_weight_gradient_chunks_sum_to_the_reference_on_exact_sums():
    """The row-chunk partials of a padded pack's weight and bias gradients, summed in chunk order by the
    Adam kernel's loop, equal torch's a^T @ g and g.sum(0) exactly on integer inputs (layer 0's shared X
    and a stacked layer; chunks that do not divide the rows)."""
    gen = torch.Generator(device=CUDA).manual_seed(torch.seed() % 2**63)
    n, rows, j_pad = 3, 4001, 70
    j_real = torch.tensor([70, 9, 33], dtype=torch.int32, device=CUDA)
    chunk_rows, n_chunks = kernels.row_chunks(rows)
    assert n_chunks > 1 and rows % chunk_rows != 0
    for a in (_integer_inputs(gen, rows, 62), _integer_inputs(gen, n, rows, 62)):
        i_real = torch.tensor([62, 62, 62] if a.dim() == 2 else [62, 40, 5], dtype=torch.int32, device=CUDA)
        g = _integer_inputs(gen, n, rows, j_pad)
        part = torch.full((n, n_chunks, 62, j_pad), float("nan"), device=CUDA)
        bias_part = torch.full((n, n_chunks, j_pad), float("nan"), device=CUDA)
        kernels.weight_grad_chunks(a, g, part, bias_part, i_real, j_real, chunk_rows, kernels.TILES["fp32"],
                                   output_layer=False)
        for m in range(n):
            i, j = int(i_real[m]), int(j_real[m])
            a_m = a if a.dim() == 2 else a[m]
            assert torch.equal(part[m, :, :i, :j].sum(0), a_m[:, :i].T @ g[m, :, :j]), m
            assert torch.equal(bias_part[m, :, :j].sum(0), g[m, :, :j].sum(0)), m


def test_kernels_address_packs_beyond_2_to_the_31_elements():
    """A pack of 9 fits x 1,000,000 rows x 256 units (2.3e9 activations, bf16) is in reach of the VRAM
    budget on a large dataset: the kernels' offsets must not wrap at 2**31. The last model's slice
    (whose offsets are all beyond 2**31) is checked against the reference."""
    n, rows, width = 9, 1_000_000, 256
    assert n * rows * width > 2**31
    gen = torch.Generator(device=CUDA).manual_seed(torch.seed() % 2**63)
    train = torch.rand(n, rows, device=CUDA, generator=gen) < 0.8
    keys = [hashing.fit_key(s) for s in range(n)]
    pack = kernels.PackDropout(keys, [0.2] * n, train)
    X = _integer_inputs(gen, rows, 4)
    w, b = _integer_inputs(gen, n, 4, width), _integer_inputs(gen, n, width)
    out = torch.empty(n, rows, width, dtype=torch.bfloat16, device=CUDA)
    reals = (torch.full((n,), 4, dtype=torch.int32, device=CUDA), torch.full((n,), width, dtype=torch.int32, device=CUDA))
    kernels.hidden_forward(X, w, b, out, *reals, pack, torch.tensor([3], device=CUDA), 0, kernels.TILES["bf16"])
    last = n - 1
    factors = _reference_factors(keys[last:], [0.2], train[last:], 3, 0, width)[0]
    assert torch.equal(out[last], (torch.relu(X @ w[last] + b[last]) * factors).to(torch.bfloat16))


def test_kernels_take_more_row_blocks_than_a_grid_axis_of_65535():
    """5,000,000 rows are 78,125 row blocks, more than CUDA's 65,535 on a grid's y and z axes: the row
    blocks go on the x axis, so a dataset of that size trains."""
    rows, width = 5_000_000, 16
    gen = torch.Generator(device=CUDA).manual_seed(torch.seed() % 2**63)
    train = torch.rand(1, rows, device=CUDA, generator=gen) < 0.8
    pack = kernels.PackDropout([hashing.fit_key(1)], [0.3], train)
    X = _integer_inputs(gen, rows, 4)
    w, b = _integer_inputs(gen, 1, 4, width), _integer_inputs(gen, 1, width)
    out = torch.empty(1, rows, width, device=CUDA)
    reals = (torch.full((1,), 4, dtype=torch.int32, device=CUDA), torch.full((1,), width, dtype=torch.int32, device=CUDA))
    kernels.hidden_forward(X, w, b, out, *reals, pack, torch.tensor([5], device=CUDA), 1, kernels.TILES["fp32"])
    factors = _reference_factors([hashing.fit_key(1)], [0.3], train, 5, 1, width)[0]
    assert torch.equal(out[0], torch.relu(X @ w[0] + b[0]) * factors)
