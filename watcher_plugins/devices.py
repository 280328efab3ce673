"""Which GPUs a run may use, found through NVML (no CUDA framework in the host process), which CPU
cores, and how much host memory."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

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
    None where none of them can be read. ``root`` is for tests.

    A cgroup's usage counts the page cache it has filled, which the kernel reclaims before it refuses
    memory; as kubelet's working set does, the inactive file cache is not counted as used."""
    room = []
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for group in _memory_cgroups(root):
        try:
            limit = (group.directory / group.limit).read_text().strip()
            if limit == "max" or int(limit) >= _NO_LIMIT:
                continue
            used = int((group.directory / group.usage).read_text()) - _stat(group.directory, group.inactive_file)
            room.append(max(0, int(limit) - max(0, used)))
        except (OSError, ValueError):
            continue
    return min(room) if room else None


@dataclass(frozen=True)
class _MemoryCgroup:
    directory: Path
    limit: str  # the file names, which differ between cgroup v2 and v1
    usage: str
    inactive_file: str  # the key in memory.stat


_CGROUP_V2 = ("memory.max", "memory.current", "inactive_file")
_CGROUP_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _memory_cgroups(root: Path) -> list[_MemoryCgroup]:
    """This process's memory cgroups, its own and each one above it (cgroup v2 and v1)."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except (OSError, ValueError):
        return []
    found = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue  # not a cgroup line: no limit to read from it
        _, controllers, path = fields
        if controllers == "":
            mount, names = root / "sys/fs/cgroup", _CGROUP_V2
        elif "memory" in controllers.split(","):
            mount, names = root / "sys/fs/cgroup/memory", _CGROUP_V1
        else:
            continue
        parts = [p for p in path.split("/") if p]
        # Inside a cgroup namespace the path may not exist under the mount (it is then the mount itself).
        for depth in range(len(parts), -1, -1):
            found.append(_MemoryCgroup(mount.joinpath(*parts[:depth]), *names))
    return found


def _stat(directory: Path, key: str) -> int:
    """A value of the cgroup's memory.stat; 0 where it cannot be read."""
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


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


_Env = TypeVar("_Env", bound=MutableMapping[str, str])


def pin_environment(env: _Env, gpu: int | None) -> _Env:
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


def resolve_devices(devices_param: str | list[int], where: str = "params::$.devices") -> list[int]:
    """Physical GPU indices for the ``devices`` param: "auto" (every visible GPU), "cpu" (none), or a list.
    ``where`` names the param in errors (``SOURCE::$.path``, the file or --params that set it)."""
    if devices_param == "cpu":
        return []
    count = physical_gpu_count()
    if devices_param == "auto":
        visible = _visible_from_env(count)
        return visible if visible is not None else list(range(count))
    indices = cast("list[int]", devices_param)  # the params schema allows no other string
    missing = [index for index in indices if index >= count]
    if missing:
        raise ManifestError([f"{where}: GPU {', '.join(map(str, missing))} not found: this host has "
                             f"{count} GPU{'s' if count != 1 else ''}" + (" (NVML sees none)" if not count else "")])
    return list(indices)
