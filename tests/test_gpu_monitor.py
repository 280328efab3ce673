"""GpuMonitor: samples on a fixed interval, converts NVML units, and never breaks a run on a GPU-less host.

The sampler logic is tested through ``ScriptedCounters``, a test double of NVML's hardware counters
(which do not exist on the CPU-only test machine); the real pynvml is tested for degrading quietly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from watcher_plugins import gpu_monitor
from watcher_plugins.devices import physical_gpu_count
from watcher_plugins.gpu_monitor import GpuMonitor, GpuReading, GpuSample

MIB = 1024 * 1024


class ScriptedCounters:
    """Stands in for NVML: each read of a GPU returns the next scripted reading (the last one repeats)."""

    def __init__(self, readings: dict[int, list[GpuReading]], failing: frozenset[int] = frozenset(),
                 open_error: Exception | None = None):
        self.readings = readings
        self.failing = failing
        self.open_error = open_error
        self.reads: dict[int, int] = dict.fromkeys(readings, 0)
        self.opened = 0
        self.closed = 0

    def open(self) -> None:
        self.opened += 1
        if self.open_error is not None:
            raise self.open_error

    def read(self, gpu: int) -> GpuReading:
        if gpu in self.failing:
            raise RuntimeError(f"GPU {gpu} is lost")
        script = self.readings[gpu]
        reading = script[min(self.reads[gpu], len(script) - 1)]
        self.reads[gpu] += 1
        return reading

    def close(self) -> None:
        self.closed += 1


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def test_sample_once_records_each_gpu_in_percent_and_mib():
    counters = ScriptedCounters({0: [GpuReading(73.0, 1536 * MIB, 143771 * MIB)],
                                 3: [GpuReading(5.0, 512 * MIB, 81559 * MIB)]})
    monitor = GpuMonitor([0, 3], reader=counters)

    taken = monitor.sample_once(1.23456)

    assert taken == [GpuSample(1.235, 0, 73.0, 1536.0, 143771.0), GpuSample(1.235, 3, 5.0, 512.0, 81559.0)]
    assert monitor.samples == taken


def test_samples_on_the_interval_from_start_until_stop():
    counters = ScriptedCounters({0: [GpuReading(float(u), u * MIB, 1000 * MIB) for u in range(0, 100, 10)],
                                 1: [GpuReading(50.0, 10 * MIB, 1000 * MIB)]})
    with GpuMonitor([0, 1], interval_s=0.02, reader=counters) as monitor:
        assert monitor.available
        wait_for(lambda: len(monitor.samples) >= 8)
    count_at_stop = len(monitor.samples)
    time.sleep(0.06)

    samples = monitor.samples
    assert len(samples) == count_at_stop  # nothing is sampled after stop
    assert counters.opened == 1 and counters.closed == 1
    gpu0 = [s for s in samples if s.gpu == 0]
    assert [s.utilization_pct for s in gpu0] == [float(min(10 * i, 90)) for i in range(len(gpu0))]
    times = [s.t_s for s in gpu0]
    assert times[0] < 0.02  # the first sample is taken at start, not one interval later
    assert times == sorted(times)
    # A fixed schedule: the n-th sample is near n * interval, not drifting by the time reads take.
    assert times[-1] >= 0.02 * (len(times) - 1) - 0.005


def test_a_gpu_that_cannot_be_read_is_skipped_and_counted():
    counters = ScriptedCounters({0: [GpuReading(10.0, MIB, 2 * MIB)], 1: []}, failing=frozenset({1}))
    monitor = GpuMonitor([0, 1], reader=counters)

    monitor.sample_once(0.0)
    monitor.sample_once(0.5)

    assert [s.gpu for s in monitor.samples] == [0, 0]
    assert monitor.failed_reads == 2


def test_no_devices_records_nothing_and_never_opens_nvml():
    counters = ScriptedCounters({})
    with GpuMonitor([], reader=counters) as monitor:
        pass
    assert monitor.samples == [] and not monitor.available
    assert counters.opened == 0
    assert monitor.unavailable_reason == "no GPU devices to monitor"


def test_nvml_that_fails_to_start_records_nothing_and_says_why():
    counters = ScriptedCounters({0: [GpuReading(1.0, 1, 1)]},
                                open_error=OSError("NVML Shared Library Not Found"))
    monitor = GpuMonitor([0], interval_s=0.01, reader=counters)
    monitor.start()
    time.sleep(0.03)
    monitor.stop()
    monitor.stop()  # idempotent

    assert monitor.samples == [] and not monitor.available
    assert monitor.unavailable_reason == "NVML unavailable: OSError: NVML Shared Library Not Found"
    assert counters.reads[0] == 0 and counters.closed == 0


@pytest.mark.skipif(physical_gpu_count() > 0, reason="checks the GPU-less fallback; this host has a GPU")
def test_real_pynvml_without_a_gpu_degrades_to_no_samples():
    with GpuMonitor([0, 1], interval_s=0.01) as monitor:
        time.sleep(0.05)
    assert monitor.samples == []
    assert not monitor.available
    assert monitor.unavailable_reason.startswith("NVML unavailable: ")


def test_to_json_is_json_with_every_sample():
    counters = ScriptedCounters({2: [GpuReading(40.0, 3 * MIB, 8 * MIB)]})
    monitor = GpuMonitor([2], interval_s=0.25, reader=counters)
    monitor.sample_once(0.0)

    document = json.loads(json.dumps(monitor.to_json()))

    assert document["devices"] == [2] and document["interval_s"] == 0.25
    assert document["samples"] == [{"t_s": 0.0, "gpu": 2, "utilization_pct": 40.0,
                                    "memory_used_mib": 3.0, "memory_total_mib": 8.0}]


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        GpuMonitor([0], interval_s=0)


def test_importing_the_monitor_does_not_import_torch():
    # The host process samples while workers own CUDA; importing a CUDA framework here would break that.
    code = "import sys, watcher_plugins.gpu_monitor; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_long_run_keeps_a_bounded_chart_of_the_whole_run(monkeypatch):
    # A run of days at 0.5 s would keep millions of samples: past the cap, pairs merge and the interval
    # doubles. What a chart must not lose stays: the time span, the mean use, the memory peak.
    monkeypatch.setattr(gpu_monitor, "MAX_SAMPLES_PER_GPU", 8)
    clock = {"t": 0.0}

    class Counters:  # 40% busy throughout; memory grows by 1 MiB a second, so its peak is the last reading
        def open(self): pass
        def close(self): pass
        def read(self, gpu):
            return GpuReading(40.0, int((1024 + clock["t"]) * MIB), 4096 * MIB)

    monitor = GpuMonitor([0, 1], interval_s=0.5, reader=Counters())
    while clock["t"] <= 600:  # as the sampling thread's schedule goes: every interval_s, as it now is
        last = clock["t"]
        monitor.sample_once(last)
        clock["t"] += monitor.interval_s
    for gpu in (0, 1):
        kept = [s for s in monitor.samples if s.gpu == gpu]
        assert 4 <= len(kept) <= 8
        times = [s.t_s for s in kept]
        assert times == sorted(times) and times[0] == 0.0
        assert all(s.utilization_pct == 40.0 for s in kept)
        assert max(s.memory_used_mib for s in kept) == 1024 + last
    assert 600 / 8 <= monitor.interval_s <= 600 / 2  # from 0.5 s: the chart's resolution follows the run


def test_merged_samples_take_the_mean_utilisation_and_the_peak_memory():
    pair = [GpuSample(1.0, 0, 0.0, 900.0, 2000.0), GpuSample(1.5, 0, 100.0, 700.0, 2000.0),
            GpuSample(1.0, 1, 30.0, 10.0, 80.0)]
    assert gpu_monitor._merged_in_pairs(pair) == [GpuSample(1.0, 0, 50.0, 900.0, 2000.0),
                                                  GpuSample(1.0, 1, 30.0, 10.0, 80.0)]
