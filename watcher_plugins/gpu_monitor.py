"""GPU utilisation and memory over time, sampled through NVML on a background thread.

The monitor runs in the host process, which never imports a CUDA framework (DESIGN.md, principle 3):
NVML reads the driver's counters without creating a CUDA context, so sampling costs no GPU memory and
cannot disturb the workers. NVML numbers GPUs physically and ignores CUDA_VISIBLE_DEVICES, which is
what we want: ``devices`` are the physical indices that ``resolve_devices`` returns and leases use.

Where there is no NVIDIA driver, no pynvml or no device listed, the monitor records nothing and never
raises: a report without a GPU section is better than a run that fails for want of a chart.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024
# Samples kept per GPU. Past it, each GPU's samples are merged in pairs and the interval doubles, so a run
# of days keeps a chart of the whole run in bounded memory (two hours at 0.5 s before the first merge).
MAX_SAMPLES_PER_GPU = 14_400


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU."""

    t_s: float  # seconds since the monitor started
    gpu: int  # physical GPU index (NVML numbering)
    utilization_pct: float  # share of the last sample period in which a kernel ran
    memory_used_mib: float
    memory_total_mib: float


@dataclass(frozen=True)
class GpuReading:
    """What a reader returns for one GPU: NVML's raw units."""

    utilization_pct: float
    memory_used_bytes: int
    memory_total_bytes: int


class GpuCounterReader(Protocol):
    """The few NVML calls the monitor makes; injectable so that the sampler can be tested without a GPU."""

    def open(self) -> None:
        """Initialise the library; raise if there is no driver or no library."""

    def read(self, gpu: int) -> GpuReading:
        """Current utilisation and memory of one GPU; raise if it cannot be read."""

    def close(self) -> None:
        """Release the library."""


class PynvmlReader:
    """The real reader: pynvml, from the nvidia-ml-py package, imported only when a monitor starts."""

    def __init__(self) -> None:
        self._nvml: Any = None  # the pynvml module, once open() imports it
        self._handles: dict[int, object] = {}

    def open(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml

    def read(self, gpu: int) -> GpuReading:
        nvml = self._nvml
        if gpu not in self._handles:
            self._handles[gpu] = nvml.nvmlDeviceGetHandleByIndex(gpu)
        handle = self._handles[gpu]
        utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuReading(float(utilization.gpu), int(memory.used), int(memory.total))

    def close(self) -> None:
        if self._nvml is not None:
            self._handles.clear()
            self._nvml.nvmlShutdown()
            self._nvml = None


class GpuMonitor:
    """Samples each listed GPU every ``interval_s`` seconds between start() and stop(), or inside ``with``.

    ``samples`` are in time order; ``available`` says whether NVML could be used at all and, when it
    could not, ``unavailable_reason`` says why. Past ``MAX_SAMPLES_PER_GPU`` samples of a GPU, pairs of
    consecutive samples merge into one (mean utilisation, peak memory) and ``interval_s`` doubles.
    """

    def __init__(self, devices: list[int], interval_s: float = 0.5, reader: GpuCounterReader | None = None):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.devices = list(devices)
        self.interval_s = float(interval_s)
        self.available = False
        self.unavailable_reason: str | None = None
        self.failed_reads = 0
        self._reader = reader if reader is not None else PynvmlReader()
        self._samples: list[GpuSample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = 0.0

    def __enter__(self) -> GpuMonitor:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def samples(self) -> list[GpuSample]:
        with self._lock:
            return list(self._samples)

    def start(self) -> None:
        """Open NVML and start sampling; with no devices or no NVML, do nothing."""
        if self._thread is not None:
            return
        if not self.devices:
            self.unavailable_reason = "no GPU devices to monitor"
            return
        try:
            self._reader.open()
        except Exception as exc:  # ImportError, or pynvml.NVMLError and its many per-code subclasses
            self.unavailable_reason = f"NVML unavailable: {type(exc).__name__}: {exc}"
            logger.debug("GPU monitor off: %s", self.unavailable_reason)
            return
        self.available = True
        self._started_at = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and release NVML; safe to call more than once."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            self._reader.close()
        except Exception as exc:
            logger.debug("GPU monitor: closing NVML failed: %s", exc)

    def sample_once(self, t_s: float) -> list[GpuSample]:
        """Read every device once and record the readings at time ``t_s``; a device that fails is skipped."""
        taken = []
        for gpu in self.devices:
            try:
                reading = self._reader.read(gpu)
            except Exception as exc:  # a GPU that fell off the bus must not end the run
                self.failed_reads += 1
                logger.debug("GPU monitor: reading GPU %d failed: %s", gpu, exc)
                continue
            taken.append(GpuSample(
                t_s=round(t_s, 3), gpu=gpu, utilization_pct=reading.utilization_pct,
                memory_used_mib=round(reading.memory_used_bytes / _MIB, 1),
                memory_total_mib=round(reading.memory_total_bytes / _MIB, 1)))
        with self._lock:
            self._samples.extend(taken)
            if len(self._samples) > MAX_SAMPLES_PER_GPU * len(self.devices):
                self._samples = _merged_in_pairs(self._samples)
                self.interval_s *= 2
        return taken

    def _run(self) -> None:
        # A fixed schedule (start + k * interval) rather than sleep(interval) after each read, so that
        # the time NVML takes does not stretch the interval over a long run.
        # After a read slower than the interval, the missed ticks are skipped, not caught up in a burst.
        while True:
            self.sample_once(time.monotonic() - self._started_at)
            elapsed = time.monotonic() - self._started_at
            next_tick = (math.floor(elapsed / self.interval_s) + 1) * self.interval_s
            if self._stop.wait(next_tick - elapsed):
                return

    def to_json(self) -> dict:
        """The settings (``interval_s`` as it is now) and every sample, JSON-ready (e.g. for
        output_dir/gpu_samples.json)."""
        return {
            "devices": self.devices,
            "interval_s": self.interval_s,
            "available": self.available,
            "unavailable_reason": self.unavailable_reason,
            "failed_reads": self.failed_reads,
            "samples": [asdict(sample) for sample in self.samples],
        }


def _merged_in_pairs(samples: list[GpuSample]) -> list[GpuSample]:
    """Each GPU's consecutive samples merged in pairs: the first one's time, the mean utilisation (a busy
    share of the doubled period) and the peak memory (what a chart of memory must not lose)."""
    by_gpu: dict[int, list[GpuSample]] = {}
    for sample in samples:
        by_gpu.setdefault(sample.gpu, []).append(sample)
    merged = []
    for gpu_samples in by_gpu.values():
        for i in range(0, len(gpu_samples), 2):
            pair = gpu_samples[i:i + 2]
            merged.append(GpuSample(
                t_s=pair[0].t_s, gpu=pair[0].gpu,
                utilization_pct=round(sum(s.utilization_pct for s in pair) / len(pair), 1),
                memory_used_mib=max(s.memory_used_mib for s in pair),
                memory_total_mib=max(s.memory_total_mib for s in pair)))
    return sorted(merged, key=lambda sample: (sample.t_s, sample.gpu))
