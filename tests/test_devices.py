"""Which GPUs and CPU cores a run uses, and how its child processes are told which GPU is theirs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from watcher_plugins import devices
from watcher_plugins.devices import available_cores, pin_environment, resolve_devices
from watcher_plugins.errors import ManifestError
from watcher_plugins.executor import RunContext


@pytest.mark.parametrize("visible, expected", [
    ("-1", []),          # the usual way to hide every GPU: CUDA sees none, so the run uses none
    ("", []),
    ("2,3", [2, 3]),
    ("0,5,1", [0]),      # CUDA's list ends at its first entry that is not a GPU of this host
    ("1, 0", [1, 0]),
])
def test_devices_auto_reads_cuda_visible_devices_as_cuda_does(monkeypatch, visible, expected):
    monkeypatch.setattr(devices, "physical_gpu_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert resolve_devices("auto") == expected


@pytest.mark.parametrize("visible, message", [
    ("0,0", "CUDA_VISIBLE_DEVICES=0,0: GPU 0 is listed twice"),
    ("GPU-5d2c9f1e-aaaa", "no GPU of this host has the UUID GPU-5d2c9f1e-aaaa"),  # no NVML here either
    ("MIG-1", "MIG instances cannot be leased by GPU index"),
])
def test_a_cuda_visible_devices_the_run_cannot_honour_is_refused(monkeypatch, visible, message):
    # Widening it to every GPU (as before) would put the run on GPUs the user had hidden.
    monkeypatch.setattr(devices, "physical_gpu_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(ManifestError, match=message):
        resolve_devices("auto")


def test_devices_auto_without_cuda_visible_devices_is_every_gpu(monkeypatch):
    monkeypatch.setattr(devices, "physical_gpu_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert resolve_devices("auto") == [0, 1, 2]


def test_child_processes_number_gpus_as_nvml_and_the_leases_do():
    # CUDA's default order is fastest first; NVML's (the leases', the monitor's) is PCI bus order.
    from watcher_plugins.child_process import child_environment

    assert pin_environment({}, 3) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "3"}
    assert pin_environment({"CUDA_VISIBLE_DEVICES": "0,1"}, None)["CUDA_VISIBLE_DEVICES"] == ""
    env = child_environment(1)
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["CUDA_VISIBLE_DEVICES"] == "1"


def test_a_gpu_named_by_uuid_is_its_nvml_index(monkeypatch):
    # Containers often set CUDA_VISIBLE_DEVICES=GPU-<uuid>; NVML maps it to the index leases count by.
    monkeypatch.setattr(devices, "physical_gpu_count", lambda: 4)
    monkeypatch.setattr(devices, "_index_of_uuid", lambda uuid, raw: {"GPU-a": 2, "GPU-b": 0}[uuid])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-b")
    assert resolve_devices("auto") == [2, 0]


def test_available_cores_keep_to_the_cpu_quota(monkeypatch, tmp_path):
    # A container's CPU quota (cgroup cpu.max) caps the cores as joblib reads it; LOKY_MAX_CPU_COUNT is
    # the cap joblib takes from the environment, where a test cannot set a cgroup quota.
    affinity = sorted(os.sched_getaffinity(0))
    assert available_cores() == affinity
    assert available_cores(limit=1) == affinity[:1]
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "1")
    assert available_cores() == affinity[:1]
    assert RunContext(output_dir=tmp_path, devices=[]).cpu_count == 1
    # So a tree pool planned for "auto" starts one worker, not one per core of the affinity.
    from watcher_plugins.tree_parallel.executor import TreeParallelExecutor

    ex = TreeParallelExecutor({"tree_parallel_workers": "auto"}, RunContext(output_dir=tmp_path, devices=[]))
    assert [(p.gpu, p.threads, p.pinned) for p in ex.placements] == [(None, 1, False)]
    # Not pinned to the first core: under a quota that core is no more this run's than the others (pools
    # of several containers would crowd onto it); the OS places its one thread.
    with ex:
        (info,) = ex.pool.ping()
    assert info["threads"] == 1 and info["affinity"] == affinity


def test_available_cores_do_not_depend_on_joblib_running_processes():
    # joblib.cpu_count() says 1 whenever joblib's own multiprocessing is off; the cores are not fewer.
    code = "from watcher_plugins.devices import available_cores; print(len(available_cores()))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "JOBLIB_MULTIPROCESSING": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert int(out) == len(os.sched_getaffinity(0))


def _fake_host(root, cgroup: str, files: dict[str, str], available_kb: int | None = 20_000_000):
    """A /proc and /sys/fs/cgroup under ``root`` with this process's cgroup lines and the given files."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup)
    if available_kb is not None:
        (root / "proc/meminfo").write_text(f"MemTotal: 32000000 kB\nMemAvailable: {available_kb} kB\n")
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


GB = 10 ** 9


def test_available_memory_is_memavailable_cut_to_every_cgroup_limit_above_the_process(tmp_path):
    # No limit anywhere (v2 "max", v1's 2**63 rounded to a page): the kernel's MemAvailable.
    host = _fake_host(tmp_path / "a", "0::/user.slice/run\n", {"sys/fs/cgroup/user.slice/run/memory.max": "max\n"})
    assert devices.available_memory(host) == 20_000_000 * 1024
    unlimited = _fake_host(tmp_path / "b", "4:memory:/docker/c1\n", {
        "sys/fs/cgroup/memory/docker/c1/memory.limit_in_bytes": "9223372036854771712\n",
        "sys/fs/cgroup/memory/docker/c1/memory.usage_in_bytes": str(5 * GB)})
    assert devices.available_memory(unlimited) == 20_000_000 * 1024
    # A container's --memory 4g with 1 GB used (cgroup v2): 3 GB left, however much the host has free.
    v2 = _fake_host(tmp_path / "c", "0::/docker/c1\n", {"sys/fs/cgroup/docker/c1/memory.max": str(4 * GB),
                                                         "sys/fs/cgroup/docker/c1/memory.current": str(GB)})
    assert devices.available_memory(v2) == 3 * GB
    # cgroup v1, the limit on a parent (a pod) and none on the process's own cgroup: the parent's counts.
    v1 = _fake_host(tmp_path / "d", "7:cpu,cpuacct:/x\n4:memory:/kubepods/pod1/c1\n", {
        "sys/fs/cgroup/memory/kubepods/pod1/c1/memory.limit_in_bytes": "9223372036854771712",
        "sys/fs/cgroup/memory/kubepods/pod1/c1/memory.usage_in_bytes": str(GB),
        "sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes": str(2 * GB),
        "sys/fs/cgroup/memory/kubepods/pod1/memory.usage_in_bytes": str(GB // 2)})
    assert devices.available_memory(v1) == 3 * GB // 2
    # Inside a cgroup namespace the listed path is not under the mount: the mount's own limit is the one.
    namespaced = _fake_host(tmp_path / "e", "0::/../../outside\n", {"sys/fs/cgroup/memory.max": str(6 * GB),
                                                                      "sys/fs/cgroup/memory.current": str(GB)})
    assert devices.available_memory(namespaced) == 5 * GB
    # Nothing readable: unknown, not zero.
    assert devices.available_memory(_fake_host(tmp_path / "f", "", {}, available_kb=None)) is None


def test_a_cgroups_reclaimable_file_cache_is_not_counted_as_used(tmp_path):
    # A long-lived container fills its cgroup with page cache (the data it read) up to its limit; the
    # kernel reclaims the inactive part before it refuses memory. 16 GB limit, 15.5 GB "used", 12 GB of
    # it inactive file cache: 12.5 GB left, not 0.5 GB.
    v2 = _fake_host(tmp_path / "v2", "0::/pod\n", {
        "sys/fs/cgroup/pod/memory.max": str(16 * GB), "sys/fs/cgroup/pod/memory.current": str(31 * GB // 2),
        "sys/fs/cgroup/pod/memory.stat": f"anon 1000\nactive_file 5\ninactive_file {12 * GB}\n"})
    assert devices.available_memory(v2) == 25 * GB // 2
    v1 = _fake_host(tmp_path / "v1", "4:memory:/pod\n", {
        "sys/fs/cgroup/memory/pod/memory.limit_in_bytes": str(16 * GB),
        "sys/fs/cgroup/memory/pod/memory.usage_in_bytes": str(31 * GB // 2),
        "sys/fs/cgroup/memory/pod/memory.stat": f"cache 1\ninactive_file 7\ntotal_inactive_file {12 * GB}\n"})
    assert devices.available_memory(v1) == 25 * GB // 2


@pytest.mark.parametrize("cgroup", ["0::/\n\n", "garbage\n", "0:/\n", "\x00\xff:memory\n"])
def test_odd_cgroup_lines_are_skipped_not_fatal(tmp_path, cgroup):
    # Every tree run reads the memory, the serial one included: an odd line must not stop it.
    host = _fake_host(tmp_path, cgroup, {})
    assert devices.available_memory(host) == 20_000_000 * 1024


def test_available_memory_reads_this_host():
    room = devices.available_memory()
    assert room is not None and 0 < room <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
