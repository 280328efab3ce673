"""nn_batch on a CUDA GPU (skipped without one): the trainers agree with serial in fp32 with TF32 off,
the executor's worker holds the GPU lease, and OOM recovery really frees device memory."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from nn_cases import SETTINGS, fit_tasks, record_weight_grad_calls, with_reordered_training_rows  # noqa: E402

from watcher_plugins.errors import LeaseTimeout  # noqa: E402
from watcher_plugins.executor import RunContext  # noqa: E402
from watcher_plugins.lease import GpuLease  # noqa: E402
from watcher_plugins.nn_batch import affine as affine_module  # noqa: E402
from watcher_plugins.nn_batch import kernels  # noqa: E402
from watcher_plugins.nn_batch.device_data import DeviceDatasetCache  # noqa: E402
from watcher_plugins.nn_batch.faults import Faults  # noqa: E402
from watcher_plugins.nn_batch.fused import FusedTrainer  # noqa: E402
from watcher_plugins.nn_batch.oom import train_with_oom_recovery  # noqa: E402
from watcher_plugins.nn_batch.protocol import FitJob  # noqa: E402
from watcher_plugins.nn_batch.serial import SerialTrainer  # noqa: E402
from watcher_plugins.nn_batch.streams import StreamsTrainer  # noqa: E402
from watcher_plugins.nn_batch.training import FitTask, TrainSettings, precision_context  # noqa: E402
from watcher_plugins.records import STATUS_OK, DataRef, TrialJob  # noqa: E402

CUDA = torch.device("cuda:0")
#: The graph, OOM and worker tests' data: large enough for packs that compact and for a real OOM to matter.
GRAPH_DATA = DataRef(embedded="survivors", rows=4000)


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


@pytest.fixture(scope="module")
def serial_reference(cache):
    # serial trains nn.Linear modules, not affine's: the split test's monkeypatching cannot reach it
    return run(SerialTrainer(SETTINGS, CUDA), fit_tasks(cache), 1)


@pytest.mark.parametrize("trainer_cls", [FusedTrainer, StreamsTrainer])
def test_fused_and_streams_give_serials_r2_on_the_gpu(cache, serial_reference, trainer_cls):
    # test_nn_trainers.py's contract and batch, on the GPU's kernels (cuBLAS, Triton, CUDA graphs)
    trainer = trainer_cls(SETTINGS, CUDA)
    got = run(trainer, fit_tasks(cache), 8)
    if trainer_cls is FusedTrainer:
        assert trainer.graph_captures >= 1  # its packs replayed captured epochs
    for key, ref in serial_reference.items():
        assert ref.status == STATUS_OK and got[key].status == STATUS_OK
        assert abs(got[key].r2 - ref.r2) < 1e-4, (key, got[key].r2, ref.r2)
        assert got[key].best_epoch == ref.best_epoch


def test_a_pack_with_split_weight_gradients_gives_serials_r2_on_the_gpu(monkeypatch, cache, serial_reference):
    # 600 rows are under the split's minimum chunk: lowered, row_splits picks its own splits on this GPU
    calls = record_weight_grad_calls(monkeypatch)
    monkeypatch.setattr(affine_module, "MIN_CHUNK_ROWS", 50)
    got = run(FusedTrainer(SETTINGS, CUDA), fit_tasks(cache), 8)
    assert calls and max(splits for _, _, splits in calls) > 1
    for key, ref in serial_reference.items():
        assert got[key].status == STATUS_OK
        assert abs(got[key].r2 - ref.r2) < 1e-4, (key, got[key].r2, ref.r2)
        assert got[key].best_epoch == ref.best_epoch


def test_serial_agrees_with_itself_far_inside_the_tolerance_when_only_its_sums_are_reordered_on_the_gpu(
        cache, serial_reference):
    # as on the CPU: the batch above is one where rounding alone cannot reach 1e-4 (nn_cases' docstring)
    reordered = run(SerialTrainer(SETTINGS, CUDA), with_reordered_training_rows(fit_tasks(cache)), 1)
    for key, ref in serial_reference.items():
        assert abs(reordered[key].r2 - ref.r2) < 1e-4 / 4, (key, reordered[key].r2, ref.r2)
        assert reordered[key].best_epoch == ref.best_epoch


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
        assert (graphed[key].r2, graphed[key].best_epoch, graphed[key].epochs) == (ref.r2, ref.best_epoch, ref.epochs)


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
    # Without the Triton kernels, the torch reference builds the dropout masks, copying rows to the host
    # (dropout.draws): not allowed while a stream is captured, so the capture fails midway.
    monkeypatch.setattr(kernels, "available", lambda: False)
    eager_trainer, eager = train_fused(cache, "fp32", cuda_graphs=False)
    trainer, got = train_fused(cache, "fp32")
    assert trainer.graph_captures == 0 and "could not be captured as a CUDA graph" in caplog.text
    assert torch.cuda.current_stream(CUDA) == torch.cuda.default_stream(CUDA)
    # the log keeps no exception (with it, the failed capture's frames and autograd nodes, which the next
    # backward would meet: torch warns of an AccumulateGrad stream mismatch, once per process)
    assert not [arg for record in caplog.records for arg in record.args or () if isinstance(arg, BaseException)]
    assert {k: (o.r2, o.best_epoch) for k, o in got.items()} == {k: (o.r2, o.best_epoch) for k, o in eager.items()}


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
    import json

    monkeypatch.setenv("WATCHER_NN_FAULTS", json.dumps({"oom_at_concurrency": 1}))
    context = RunContext(output_dir=tmp_path, devices=[0], lease_dir=tmp_path / "leases")
    job = TrialJob("nn", 0, {"hidden_layers": [32], "lr": 3e-3}, GRAPH_DATA, 2, 1)
    from watcher_plugins.nn_batch.executor import NNBatchExecutor

    with NNBatchExecutor({"nn_max_epochs": 5}, context) as executor:
        results = executor.run_batch([job])
        assert executor._slots[0].worker.alive
    assert [r.status for r in results] == ["oom", "oom"]
    assert Faults.from_env().oom_at_concurrency == 1


@pytest.mark.parametrize("width", [1, 8, 37, 128, 512])
def test_mask_kernel_equals_the_torch_reference(width):
    from watcher_plugins.nn_batch import dropout as hashing

    assert kernels.available()
    gen = torch.Generator().manual_seed(torch.seed() % 2**63)  # fresh inputs each run
    rows = torch.randperm(20000, generator=gen)[:7001].sort().values.to(CUDA)
    key, epoch, layer = int(torch.randint(0, 2**32, (1,), generator=gen)), 17, 3
    for p in (0.05, 0.25, 0.5):
        got = hashing.dropout_mask(key, epoch, layer, rows, width, p)  # the kernel on CUDA
        lk = [hashing.layer_key(key, epoch, layer)]
        want = torch.where(hashing.draws(lk, rows, width)[0] >= torch.tensor(p, dtype=torch.float32),
                           torch.tensor(hashing.keep_factor(p), device=CUDA), torch.zeros((), device=CUDA))
        assert torch.equal(got, want), (width, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["strided", "contiguous", "contiguous+bias"])
def test_relu_dropout_kernel_equals_relu_times_mask_forward_and_backward(dtype, layout):
    """The fused activation against torch.relu(z [+ bias]) * masks on random inputs: bit for bit,
    outputs and input gradients (the bias gradient, a sum over rows, to float32 rounding), for layer 0's
    strided view and a contiguous layer, with dropout rates that include 0 and NaNs that must propagate."""
    from watcher_plugins.nn_batch import dropout as hashing

    gen = torch.Generator(device=CUDA).manual_seed(torch.seed() % 2**63)
    n, rows, width = 5, 3001, 96
    ps = [0.0, 0.05, 0.2, 0.35, 0.5]
    keys = [hashing.fit_key(int(torch.randint(0, 2**31, (1,)))) for _ in range(n)]
    train = torch.rand(n, rows, device=CUDA, generator=gen) < 0.8
    pack = kernels.PackDropout(keys, ps, train)
    bias = None
    if layout == "strided":
        z0 = torch.randn(rows, n * width, device=CUDA, generator=gen).to(dtype)
        z0[7, 3] = float("nan")
        z0.requires_grad_(True)
        z = z0.view(rows, n, width).transpose(0, 1)
    else:
        z0 = torch.randn(n, rows, width, device=CUDA, generator=gen).to(dtype).requires_grad_(True)
        z = z0
        if layout.endswith("bias"):
            bias = (0.5 * torch.randn(n, 1, width, device=CUDA, generator=gen)).requires_grad_(True)
    grad = torch.randn(n, rows, width, device=CUDA, generator=gen).to(dtype)
    epoch, layer = 9, 1

    out = kernels.relu_dropout(z, pack, epoch, layer, bias)
    out.backward(grad)
    got_grad, z0.grad = z0.grad.clone(), None
    got_bias_grad = None
    if bias is not None:
        got_bias_grad, bias.grad = bias.grad.clone(), None

    lks = [hashing.layer_key(k, epoch, layer) for k in keys]
    draws = hashing.draws(lks, torch.arange(rows, device=CUDA), width)
    kept = torch.tensor([hashing.keep_factor(p) for p in ps], device=CUDA).view(n, 1, 1)
    masks = torch.where(draws >= torch.tensor(ps, device=CUDA).view(n, 1, 1), kept, torch.zeros((), device=CUDA))
    masks = torch.where(train[:, :, None], masks, torch.ones((), device=CUDA))
    pre = z if bias is None else (z.float() + bias).to(dtype)
    want = torch.relu(pre) * masks.to(dtype)
    want.backward(grad)

    assert out.is_contiguous() and out.shape == (n, rows, width)
    assert torch.equal(out.isnan(), want.isnan()) and out.isnan().any() == (layout == "strided")
    assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(want))
    assert torch.equal(got_grad, z0.grad)
    if bias is not None:
        assert torch.allclose(got_bias_grad, bias.grad, rtol=1e-5, atol=1e-5)


def test_relu_dropout_kernel_addresses_packs_beyond_2_to_the_31_elements():
    """A pack of 9 fits x 1,000,000 rows x 256 units (2.3e9 activations, bf16) is in reach of the
    VRAM budget on a large dataset: the kernels' offsets must not wrap at 2**31. The last model's slice
    (whose offsets are all beyond 2**31) is checked against the reference, forward and backward."""
    from watcher_plugins.nn_batch import dropout as hashing

    n, rows, width = 9, 1_000_000, 256
    assert n * rows * width > 2**31
    gen = torch.Generator(device=CUDA).manual_seed(torch.seed() % 2**63)
    keys = [hashing.fit_key(s) for s in range(n)]
    train = torch.rand(n, rows, device=CUDA, generator=gen) < 0.8
    pack = kernels.PackDropout(keys, [0.2] * n, train)
    z = torch.randn(n, rows, width, device=CUDA, generator=gen, dtype=torch.bfloat16).requires_grad_(True)
    out = kernels.relu_dropout(z, pack, 3, 0)
    grad = torch.ones_like(out)
    out.backward(grad)
    last = n - 1
    draws = hashing.draws([hashing.layer_key(keys[last], 3, 0)], torch.arange(rows, device=CUDA), width)[0]
    mask = torch.where(draws >= torch.tensor(0.2), torch.tensor(hashing.keep_factor(0.2), device=CUDA),
                       torch.zeros((), device=CUDA))
    mask = torch.where(train[last][:, None], mask, torch.ones((), device=CUDA)).to(torch.bfloat16)
    zl = z[last].detach().requires_grad_(True)
    want = torch.relu(zl) * mask
    want.backward(grad[last])
    assert torch.equal(out[last], want)
    assert torch.equal(z.grad[last], zl.grad)


def test_relu_dropout_kernel_takes_more_row_blocks_than_a_grid_axis_of_65535():
    """Width 512 means 8 rows a block: 600,000 rows are 75,000 row blocks, more than CUDA's 65,535 on a
    grid's y axis. The row blocks go on the x axis, so a dataset of that size trains; forward and
    backward are checked against the reference for every element."""
    from watcher_plugins.nn_batch import dropout as hashing

    n, rows, width = 2, 600_000, 512
    gen = torch.Generator(device=CUDA).manual_seed(torch.seed() % 2**63)
    keys = [hashing.fit_key(s) for s in range(n)]
    train = torch.rand(n, rows, device=CUDA, generator=gen) < 0.8
    pack = kernels.PackDropout(keys, [0.3] * n, train)
    z = torch.randn(n, rows, width, device=CUDA, generator=gen).requires_grad_(True)
    out = kernels.relu_dropout(z, pack, 5, 1)
    grad = torch.randn(n, rows, width, device=CUDA, generator=gen)
    out.backward(grad)
    draws = hashing.draws([hashing.layer_key(k, 5, 1) for k in keys], torch.arange(rows, device=CUDA), width)
    mask = torch.where(draws >= torch.tensor(0.3), torch.tensor(hashing.keep_factor(0.3), device=CUDA),
                       torch.zeros((), device=CUDA))
    mask = torch.where(train[:, :, None], mask, torch.ones((), device=CUDA))
    zr = z.detach().requires_grad_(True)
    want = torch.relu(zr) * mask
    want.backward(grad)
    assert torch.equal(out, want)
    assert torch.equal(z.grad, zr.grad)
