"""The GPU monitor with the real NVML on a machine with an NVIDIA GPU (run on the device machine)."""

from __future__ import annotations

import time

import pytest

from watcher_plugins.devices import physical_gpu_count
from watcher_plugins.gpu_monitor import GpuMonitor

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(physical_gpu_count() == 0, reason="needs an NVIDIA GPU")]


def test_real_pynvml_samples_a_gpu():
    with GpuMonitor([0], interval_s=0.05) as monitor:
        deadline = time.monotonic() + 5
        while len(monitor.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(monitor.samples) >= 3
    sample = monitor.samples[0]
    assert sample.gpu == 0 and 0.0 <= sample.utilization_pct <= 100.0
    assert 0 < sample.memory_used_mib <= sample.memory_total_mib
