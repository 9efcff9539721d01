"""``farm worker``: one Celery worker process per device, each pinned to its device.

``--devices auto`` takes every visible NVIDIA GPU (or one CPU worker when there is
none), ``cpu:N`` starts N CPU workers that split the cores, ``cuda:0,2`` takes those
GPUs. Each process runs ``celery worker --pool threads -c 1`` (heartbeats keep flowing
during a render, no fork under CUDA) with ``CUDA_VISIBLE_DEVICES`` set to its GPU alone.
A process that dies is started again; Ctrl-C (SIGINT/SIGTERM) stops them all.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from farm.celery_app import worker_queue
from farm.children import die_with_parent
from farm.config import Config
from farm.redis_server import stop_processes


@dataclass(frozen=True)
class DeviceSlot:
    label: str  # as the node names it: cpu0, cuda:2
    device: str  # as the process sees it: cpu, cuda:0
    env: dict[str, str] = field(default_factory=dict)


def count_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def parse_devices(spec: str, gpus: int, cores: int) -> list[DeviceSlot]:
    """Turn ``auto``, ``cpu``, ``cpu:N`` or ``cuda:0,1`` into one slot per process."""
    spec = spec.strip().lower()
    if spec == "auto":
        spec = "cuda:" + ",".join(map(str, range(gpus))) if gpus else "cpu:1"
    if spec in ("cpu", "cpu:"):
        spec = "cpu:1"
    kind, _, rest = spec.partition(":")
    if kind == "cpu":
        try:
            n = int(rest)
        except ValueError:
            raise ValueError(f"--devices {spec!r}: cpu:N needs a number of workers") from None
        if not 1 <= n <= max(1, cores) * 4:
            raise ValueError(f"--devices {spec!r}: N must be between 1 and {max(1, cores) * 4}")
        threads = str(max(1, cores // n))
        return [
            DeviceSlot(
                f"cpu{i}",
                "cpu",
                {
                    "OMP_NUM_THREADS": threads,
                    "MKL_NUM_THREADS": threads,
                    # CPU slots share the cores with each other and the farm's other
                    # processes: an OpenMP thread that waits sleeps rather than spins
                    "OMP_WAIT_POLICY": "PASSIVE",
                    "CUDA_VISIBLE_DEVICES": "",
                },
            )
            for i in range(n)
        ]
    if kind == "cuda":
        try:
            ids = [int(x) for x in rest.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--devices {spec!r}: cuda:I,J needs GPU numbers") from None
        if not ids:
            raise ValueError(f"--devices {spec!r}: no GPU listed")
        if len(set(ids)) != len(ids):
            raise ValueError(f"--devices {spec!r}: a GPU is listed twice")
        return [DeviceSlot(f"cuda:{i}", "cuda:0", {"CUDA_VISIBLE_DEVICES": str(i)}) for i in ids]
    raise ValueError(f"--devices {spec!r}: use auto, cpu:N or cuda:0,1")


def worker_command(
    slot: DeviceSlot, config: Config, node: str, loglevel: str = "INFO"
) -> list[str]:
    hostname = f"{slot.label.replace(':', '')}@{node}"
    return [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker",
        "--pool", "threads", "--concurrency", "1",
        "--prefetch-multiplier", "1",
        "--hostname", hostname,
        "--queues", worker_queue(config.namespace, hostname),
        "--task-events",
        "--without-gossip", "--without-mingle",
        "--loglevel", loglevel,
    ]  # fmt: skip


def slot_env(slot: DeviceSlot) -> dict[str, str]:
    env = dict(os.environ)
    env.update(slot.env)
    env["FARM_DEVICE"] = slot.device
    env["FARM_DEVICE_LABEL"] = slot.label
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


class Launcher:
    def __init__(self, slots: list[DeviceSlot], config: Config, loglevel: str = "INFO"):
        self.slots = slots
        self.config = config
        self.loglevel = loglevel
        self.node = socket.gethostname()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: DeviceSlot) -> None:
        cmd = worker_command(slot, self.config, self.node, self.loglevel)
        self.procs[slot.label] = subprocess.Popen(
            cmd, env=slot_env(slot), preexec_fn=die_with_parent()
        )

    def supervise(self) -> None:
        """Restart dead workers until asked to stop."""
        backoff: dict[str, float] = {}
        while not self.stopping:
            for slot in self.slots:
                proc = self.procs.get(slot.label)
                if proc is not None and proc.poll() is not None and not self.stopping:
                    wait = backoff.get(slot.label, 1.0)
                    print(
                        f"worker {slot.label} exited with {proc.returncode}; restarting in "
                        f"{wait:.0f} s",
                        file=sys.stderr,
                    )
                    time.sleep(wait)
                    backoff[slot.label] = min(wait * 2, 60.0)
                    if not self.stopping:
                        self._spawn(slot)
            time.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping = True
        stop_processes(list(self.procs.values()), timeout)


def run(devices: str, config: Config, loglevel: str = "INFO") -> int:
    slots = parse_devices(devices, count_gpus(), os.cpu_count() or 1)
    launcher = Launcher(slots, config, loglevel)

    def on_signal(signum: int, _frame: object) -> None:
        launcher.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"starting {len(slots)} worker(s): {', '.join(s.label for s in slots)}", flush=True)
    launcher.start()
    try:
        launcher.supervise()
    finally:
        launcher.stop()
    return 0
