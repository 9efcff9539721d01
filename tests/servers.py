"""Real servers for tests, on free ports: an S3 server (moto) and a Redis server (valkey).

Both are context managers that set nothing global (no environment variables)::

    with MotoServer() as s3:
        boto3.client("s3", endpoint_url=s3.endpoint_url, **s3.client_kwargs)
    with RedisServer() as r:
        redis.Redis.from_url(r.url).ping()
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

from farm.redis_server import ping, redis_server_binary

LOCALHOST = "127.0.0.1"

__all__ = [
    "MotoServer",
    "RedisServer",
    "TcpProxy",
    "api_process",
    "free_port",
    "redis_server_binary",
]
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


class MotoServer:
    """moto's S3 (and other AWS APIs) served over HTTP from a thread of this process.

    moto keeps its state per process: two MotoServers in one process share buckets, so use
    unique bucket names. moto accepts any credentials; ``env`` has dummy ones to pass to
    subprocesses (or to ``monkeypatch.setenv``), ``client_kwargs`` the same for boto3.
    """

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.endpoint_url = ""
        self._server = None

    def __enter__(self) -> Self:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address=LOCALHOST, port=self.port, verbose=False)
        self._server.start()
        host, self.port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{self.port}"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_serving()

    def stop_serving(self) -> None:
        """Close the port: connections are refused until ``serve_again``. The buckets and
        objects stay, as moto keeps them in this process."""
        if self._server is not None:
            wsgi = self._server._server  # ThreadedMotoServer.stop leaves its socket open
            self._server.stop()
            if wsgi is not None:
                wsgi.server_close()
            self._server = None

    def serve_again(self) -> None:
        """Answer on the same port again, with the same buckets and objects."""
        from moto.server import ThreadedMotoServer

        assert self._server is None and self.port, "stop_serving first"
        self._server = ThreadedMotoServer(ip_address=LOCALHOST, port=self.port, verbose=False)
        self._server.start()

    @property
    def client_kwargs(self) -> dict[str, str]:
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        }

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }


_ping = ping


def _server_log(_dir: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "server.log"]


class RedisServer:
    """A throwaway Redis-compatible server process: no persistence, noeviction, temp dir."""

    def __init__(
        self,
        binary: str | None = None,
        extra_args: tuple[str, ...] = (),
        timeout_s: float = 10,
        data_from: str = "",
    ) -> None:
        """``data_from``: a server directory whose files this one starts from (a replica
        that took over, with ``--appendonly yes``)."""
        self.binary = binary or redis_server_binary()
        self.extra_args = tuple(extra_args)
        self.timeout_s = timeout_s
        self.data_from = data_from
        self.port = 0
        self.dir = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    def __enter__(self) -> Self:
        self.dir = tempfile.mkdtemp(prefix="farm-redis-")
        if self.data_from:
            shutil.copytree(self.data_from, self.dir, dirs_exist_ok=True, ignore=_server_log)
        try:
            for _attempt in range(3):  # the free port may be taken before the server binds
                if self._start(free_port()):
                    return self
            raise RuntimeError(f"{self.binary} did not start: {self._log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _start(self, port: int) -> bool:
        self.port = port
        args = [
            self.binary,
            "--port", str(port),
            "--bind", LOCALHOST,
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "no",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--logfile", os.path.join(self.dir, "server.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            if _ping(port):
                return True
            time.sleep(0.02)
        self.stop_process()
        raise TimeoutError(f"{self.binary} on port {port} did not answer PING in {self.timeout_s}s")

    def _log_tail(self) -> str:
        try:
            return Path(self.dir, "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop_process(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a frozen server cannot stop
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def crash(self) -> None:
        """SIGKILL the server, keeping its directory (``start_again`` brings it back)."""
        assert self.proc is not None, "server not started"
        self.proc.kill()
        self.proc.wait(timeout=5)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its port and connections but answers nothing, as a
        host that froze or a network that drops every packet does."""
        assert self.proc is not None, "server not started"
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None, "server not started"
        self.proc.send_signal(signal.SIGCONT)

    def start_again(self) -> None:
        """Start the server again on the same port and directory: with ``--appendonly yes``
        among ``extra_args`` it comes back with its data."""
        if not self._start(self.port):
            raise RuntimeError(f"{self.binary} did not start again: {self._log_tail()}")

    def restart(self, down_s: float = 0.0) -> None:
        """Crash the server, stay down ``down_s`` seconds, start it again."""
        self.crash()
        time.sleep(down_s)
        self.start_again()

    def stop(self) -> None:
        self.stop_process()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class TcpProxy:
    """A TCP relay on a free port of 127.0.0.1 to ``backend_port``, for moving a service
    to another server behind the same address (a failover).

    ``switch(port)`` sends new connections to ``port`` and leaves the ones already open
    hanging: still open, nothing relayed either way, as after a failover whose old server
    or network path went silent without closing anything."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self._listener = socket.create_server((LOCALHOST, 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._open: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def switch(self, backend_port: int) -> None:
        with self._lock:
            self.backend_port = backend_port
            for _client, _server, relaying in self._open:
                relaying.clear()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                port = self.backend_port
            try:
                server = socket.create_connection((LOCALHOST, port), timeout=5)
            except OSError:
                client.close()
                continue
            relaying = threading.Event()
            relaying.set()
            with self._lock:
                self._open.append((client, server, relaying))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b, relaying), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, relaying: threading.Event) -> None:
        try:
            while not self._closed.is_set():
                if not relaying.is_set():  # gone silent: hold the socket, relay nothing
                    self._closed.wait(0.5)
                    continue
                if not select.select([src], [], [], 0.2)[0]:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ValueError):  # closed meanwhile (a closed socket's fd is -1)
            pass
        if relaying.is_set():  # a connection closed by one side closes the other
            for sock in (src, dst):
                sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for client, server, _ in self._open:
                client.close()
                server.close()


@contextmanager
def api_process(env: dict[str, str], port: int, timeout: float = 30.0) -> Iterator[str]:
    """``python -m farm.api`` with ``env`` (which must set ``FARM_API_PORT=port``), once it
    answers ``/healthz``; yields its URL, and stops it after."""
    import httpx

    assert env.get("FARM_API_PORT") == str(port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "farm.api"], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://{LOCALHOST}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "the API did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
