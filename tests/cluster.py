"""A whole farm on real servers for integration tests.

A Redis-compatible server process, moto's S3 over HTTP, ``farm worker --devices cpu:N``
(one Celery worker subprocess per slot) and the scheduler loop in a thread that a test
can hold back to release tasks by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import redis

from farm.celery_app import make_app
from farm.config import Config
from farm.jobs import JobRecord, Ledger
from farm.redis_client import connect
from farm.stack import register_model
from farm.workers_registry import Assignments, WorkerRegistry
from scheduler.service import Scheduler
from storage import open_store
from tests.servers import MotoServer, RedisServer, TcpProxy

ROOT = Path(__file__).resolve().parents[1]


class Cluster:
    def __init__(
        self,
        tmp: Path,
        workers: int = 2,
        models: dict[str, Path] | None = None,
        schedulers: int = 0,
        env: dict[str, str] | None = None,
        redis_args: tuple[str, ...] = (),
        redis_proxy: bool = False,
        local_store: bool = False,
    ):
        """``schedulers`` = 0 runs the scheduler in a thread of the test process (a test
        can hold it back); N > 0 runs N ``farm scheduler`` processes (one leads).
        ``redis_args``: more options for the Redis server (persistence, say).
        ``redis_proxy``: every part reaches Redis through ``self.proxy``, a TcpProxy that
        a test can switch to another server (a failover).
        ``local_store``: the store is a directory (``tmp/store``) rather than S3."""
        self.tmp = tmp
        self.n_workers = workers
        self.n_schedulers = schedulers
        self.extra_env = env or {}
        self.scheduler_procs: list[subprocess.Popen[bytes]] = []
        self.models = models or {}
        self.redis_server = RedisServer(extra_args=redis_args)
        self.use_proxy = redis_proxy
        self.local_store = local_store
        self.proxy: TcpProxy | None = None
        self.moto = MotoServer()
        self.bucket = "farm-" + uuid.uuid4().hex[:8]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sched_enabled = threading.Event()
        self.sched_enabled.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Cluster:
        self.redis_server.__enter__()
        redis_url = self.redis_server.url
        if self.use_proxy:
            self.proxy = TcpProxy(self.redis_server.port)
            redis_url = self.proxy.url
        self.moto.__enter__()
        for k, v in self.moto.env.items():
            os.environ[k] = v  # boto3 in this process (S3Store, checks)
        self.config = replace(
            Config.from_env(self.extra_env),
            data_dir=str(self.tmp),
            redis_url=redis_url,
            namespace="t" + uuid.uuid4().hex[:6],
            storage_url=(
                f"file://{self.tmp / 'store'}"
                if self.local_store
                else f"s3://{self.bucket}/out?create=1"
            ),
            model_cache=str(self.tmp / "worker-cache"),
            worker_ttl=int(self.extra_env.get("FARM_WORKER_TTL", 10)),
            queue_depth=2,
            scheduler_interval=0.05,
        )
        self.r = connect(self.config)
        self.ledger = Ledger(self.r, self.config.namespace)
        self.store = open_store(self.config.storage_url)
        self.s3 = boto3.client("s3", **self.moto.client_kwargs)
        # register with a separate cache so workers really fetch from S3
        upload_cfg = replace(self.config, model_cache=str(self.tmp / "upload-cache"))
        for name, path in self.models.items():
            register_model(upload_cfg, self.r, path, name)
        self.start_workers()
        if self.n_schedulers:
            for i in range(self.n_schedulers):
                log = open(self.tmp / f"scheduler{i}.log", "ab")
                self.scheduler_procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "farm.cli", "scheduler"],
                        env=self.env(),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=ROOT,
                    )  # fmt: skip
                )
            self.procs.extend(self.scheduler_procs)
        else:
            self.scheduler = Scheduler(self.config, self.r)
            self._thread = threading.Thread(target=self._sched_loop, daemon=True)
            self._thread.start()
        return self

    def inventories(self) -> dict[str, dict[str, Any]]:
        return {w["name"]: w for w in WorkerRegistry(self.r, self.config.namespace).live()}

    def assignments_decided(self) -> dict[str, int]:
        return Assignments(self.r, self.config.namespace).decided_loads()

    def assignments_blocked(self) -> dict[str, set[str]]:
        return Assignments(self.r, self.config.namespace).blocked()

    def leader_pid(self) -> int | None:
        raw = self.r.get(f"{self.config.namespace}:scheduler:leader")
        return int(raw.decode().split("-")[0]) if raw else None

    def env(self) -> dict[str, str]:
        c = self.config
        return {
            **os.environ,
            **self.moto.env,
            "FARM_REDIS_URL": c.redis_url,
            "FARM_NAMESPACE": c.namespace,
            "FARM_STORAGE_URL": c.storage_url,
            "FARM_MODEL_CACHE": c.model_cache,
            "FARM_WORKER_TTL": str(c.worker_ttl),
            "FARM_QUEUE_DEPTH": str(c.queue_depth),
            "FARM_SCHEDULER_INTERVAL": str(c.scheduler_interval),
            "FARM_DATA_DIR": c.data_dir,
            "PYTHONPATH": str(ROOT),
            "TRANSFORMERS_VERBOSITY": "error",
            "HF_HUB_OFFLINE": "1",
            **self.extra_env,
        }

    def start_workers(self, timeout: float = 120.0) -> None:
        log = open(self.tmp / "workers.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "farm.cli", "worker", "--devices", f"cpu:{self.n_workers}",
             "--loglevel", "WARNING"],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        self.procs.append(proc)
        reg = WorkerRegistry(self.r, self.config.namespace)
        deadline = time.monotonic() + timeout
        while len(reg.live()) < self.n_workers:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("workers did not start:\n" + self.worker_log()[-3000:])
            time.sleep(0.2)

    def worker_log(self) -> str:
        return (self.tmp / "workers.log").read_text(errors="replace")

    def _sched_loop(self) -> None:
        while not self._stop.is_set():
            if self.sched_enabled.is_set():
                self.scheduler.tick()
            self.scheduler.ledger.wait_wake(self.config.scheduler_interval)

    def celery(self) -> Any:
        return make_app(self.config)

    def wait(self, job_id: str, timeout: float = 180.0) -> JobRecord:
        deadline = time.monotonic() + timeout
        while True:
            try:
                job = self.ledger.get(job_id)
            except (redis.ConnectionError, redis.TimeoutError):  # Redis restarting, moving
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
                continue
            if job.state in ("done", "failed", "cancelled") and job.outstanding == 0:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"{job.summary()}\n{self.worker_log()[-3000:]}")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.moto.__exit__(None, None, None)
        if self.proxy is not None:
            self.proxy.__exit__()
        self.redis_server.__exit__(None, None, None)


def tiny_models(tmp: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """One tiny SD1-layout checkpoint per name (different weights each), for ``Cluster``."""
    from workers.engine.tiny import write_tiny_checkpoint

    return {
        name: Path(write_tiny_checkpoint(tmp / f"{name}.safetensors", seed=i))
        for i, name in enumerate(names)
    }


def wait_for(pred: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``pred`` until it is true; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)
