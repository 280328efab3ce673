"""Which GPUs a run may use, found through NVML (no CUDA framework in the host process)."""

from __future__ import annotations

import os

from watcher_plugins.errors import ManifestError


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


def _visible_from_env(count: int) -> list[int] | None:
    """GPU indices allowed by CUDA_VISIBLE_DEVICES, when it is set to plain indices."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    indices = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit():
            return None  # UUIDs or MIG names: we cannot map them to lease indices, so ignore the mask
        if int(part) < count:
            indices.append(int(part))
    return indices


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
