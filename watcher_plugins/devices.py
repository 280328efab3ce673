"""Which GPUs a run may use, found through NVML (no CUDA framework in the host process), which CPU
cores, and how much host memory."""

from __future__ import annotations

import os
from pathlib import Path

from watcher_plugins.errors import ManifestError


def affinity_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def available_cores(limit: int | None = None) -> list[int]:
    """The CPU cores this process may use: its affinity, cut to its CPU quota, at most ``limit``.

    A container given 4 CPUs of a 64-core host may be pinned to all 64 cores yet run only 4 at once;
    threads or workers sized by the affinity alone would oversubscribe it 16 times. joblib reads the
    quota (cgroup v1 and v2, and LOKY_MAX_CPU_COUNT) through loky's cpu_count; joblib's own answers 1
    whenever joblib cannot run processes (JOBLIB_MULTIPROCESSING=0, no usable /dev/shm)."""
    from joblib.externals.loky import cpu_count

    cores = affinity_cores()
    n = min(len(cores), cpu_count(), limit or len(cores))
    return cores[:max(1, n)]


# A cgroup memory limit at or above this is "no limit" (cgroup v1 writes 2**63 rounded down to a page).
_NO_LIMIT = 2 ** 60


def available_memory(root: Path = Path("/")) -> int | None:
    """Bytes of memory this process may still take: the kernel's MemAvailable, cut to what the memory
    limits of its cgroup and the cgroups above it leave (a container's ``--memory``, a pod's limit);
    None where none of them can be read. ``root`` is for tests."""
    room = []
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for directory, limit_file, usage_file in _memory_cgroups(root):
        try:
            limit = (directory / limit_file).read_text().strip()
            if limit != "max" and int(limit) < _NO_LIMIT:
                room.append(max(0, int(limit) - int((directory / usage_file).read_text())))
        except (OSError, ValueError):
            continue
    return min(room) if room else None


def _memory_cgroups(root: Path) -> list[tuple[Path, str, str]]:
    """This process's memory cgroup directories, its own and each one above it (cgroup v2 and v1), with
    the names of their limit and usage files."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            mount, files = root / "sys/fs/cgroup", ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            mount, files = root / "sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        # Inside a cgroup namespace the path may not exist under the mount (it is then the mount itself).
        for depth in range(len(parts), -1, -1):
            found.append((mount.joinpath(*parts[:depth]), *files))
    return found


def physical_gpu_count() -> int:
    """GPUs NVML sees on this host; 0 where there is no NVIDIA driver."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except Exception:  # pynvml.NVMLError and its many subclasses: no driver, no device
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def pin_environment(env: dict[str, str], gpu: int | None) -> dict[str, str]:
    """``env`` for a child process that may use GPU ``gpu`` alone (None: no GPU). CUDA is told to number
    the GPUs in PCI bus order, as NVML does: the run's devices, the leases and the GPU monitor all count
    that way, while CUDA's own default order (fastest first) may differ on a host with mixed GPUs."""
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = "" if gpu is None else str(gpu)
    return env


def _visible_from_env(count: int) -> list[int] | None:
    """The GPUs CUDA_VISIBLE_DEVICES lets CUDA see, read as CUDA reads it: the list ends at its first
    entry that is not a GPU of this host (so "-1" hides them all). None where it is unset."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    indices: list[int] = []
    for part in (p.strip() for p in raw.split(",")):
        if part.upper().startswith("MIG-"):
            raise ManifestError([f"CUDA_VISIBLE_DEVICES={raw}: MIG instances cannot be leased by GPU index; "
                                 "name whole GPUs there, or list them in params.devices"])
        if part.upper().startswith("GPU-"):
            part = str(_index_of_uuid(part, raw))
        if not part.isdigit() or int(part) >= count:
            break
        if int(part) in indices:
            raise ManifestError([f"CUDA_VISIBLE_DEVICES={raw}: GPU {part} is listed twice"])
        indices.append(int(part))
    return indices


def _index_of_uuid(uuid: str, raw: str) -> int:
    """NVML's index of the GPU with this UUID (containers often name their GPU so)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetIndex(pynvml.nvmlDeviceGetHandleByUUID(uuid)))
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - no NVML, no such GPU: the mask cannot be honoured
        raise ManifestError([f"CUDA_VISIBLE_DEVICES={raw}: no GPU of this host has the UUID {uuid} ({exc}); "
                             "name GPUs by index there, or list them in params.devices"]) from None


def resolve_devices(devices_param: str | list[int]) -> list[int]:
    """Physical GPU indices for the ``devices`` param: "auto" (every visible GPU), "cpu" (none), or a list."""
    if devices_param == "cpu":
        return []
    count = physical_gpu_count()
    if devices_param == "auto":
        visible = _visible_from_env(count)
        return visible if visible is not None else list(range(count))
    missing = [index for index in devices_param if index >= count]
    if missing:
        raise ManifestError([f"params::$.devices: GPU {', '.join(map(str, missing))} not found: this host has "
                             f"{count} GPU{'s' if count != 1 else ''}" + (" (NVML sees none)" if not count else "")])
    return list(devices_param)
