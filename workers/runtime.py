"""What one worker process holds: its device, the loaded model, Redis and storage.

A worker keeps one model loaded between tasks and loads another only when a task asks
for it. Model files come from the model store into a node-local cache directory.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from farm.config import Config
from farm.jobs import Ledger
from farm.models import ModelEntry, ModelRegistry
from farm.workers_registry import WorkerRegistry
from storage import open_store
from storage.models import ModelStore

log = logging.getLogger("farm.worker")


def worker_device() -> str:
    """The torch device this process renders on (set by the launcher)."""
    return os.environ.get("FARM_DEVICE", "cpu")


def device_label() -> str:
    """The device as the node sees it (cuda:3 rather than the pinned cuda:0)."""
    return os.environ.get("FARM_DEVICE_LABEL", worker_device())


@dataclass
class Stats:
    loads: int = 0
    load_seconds: dict[str, float] = field(default_factory=dict)
    tasks: int = 0
    images: int = 0
    render_seconds: float = 0.0


class Runtime:
    def __init__(self, config: Config, name: str | None = None):
        self.config = config
        self.name = name or f"{device_label()}@{socket.gethostname()}"
        self.r = redis.Redis.from_url(config.redis())
        self.ledger = Ledger(self.r, config.namespace)
        self.models = ModelRegistry(self.r, config.namespace)
        self.registry = WorkerRegistry(self.r, config.namespace)
        self.store = open_store(config.storage_url)
        self.model_store = ModelStore(self.store, config.model_cache)
        self.device = worker_device()
        self.engine: Any = None
        self.engine_model: tuple[str, str] | None = None  # (name, sha256)
        self.current_task: str | None = None
        self.stats = Stats()
        self._lock = threading.Lock()
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    # model handling
    def engine_for(self, model: str) -> Any:
        entry = self.models.get(model)
        if entry is None:
            raise LookupError(f"model {model!r} is not registered")
        ident = (entry.name, entry.sha256)
        with self._lock:
            if self.engine is not None and self.engine_model == ident:
                return self.engine
            self.engine = None  # drop the old weights before loading new ones
            self.engine_model = None
            t0 = time.perf_counter()
            engine = self._load(entry)
            dt = time.perf_counter() - t0
            self.engine, self.engine_model = engine, ident
            self.stats.loads += 1
            self.stats.load_seconds[entry.name] = dt
            log.info("%s loaded model %s in %.2f s", self.name, entry.name, dt)
            self.r.xadd(
                self.ledger.events_key,
                {
                    "type": "model-loaded",
                    "worker": self.name,
                    "model": entry.name,
                    "seconds": f"{dt:.3f}",
                },
                maxlen=100_000,
                approximate=True,
            )
            return engine

    def _load(self, entry: ModelEntry) -> Any:
        if entry.engine == "synthetic":
            from workers.engine.synthetic import SyntheticEngine

            return SyntheticEngine()
        from workers.engine.loader import load_engine

        path = self.model_store.fetch(entry.sha256)
        return load_engine(path, device=self.device)

    # inventory / heartbeat
    def inventory(self) -> dict[str, Any]:
        return {
            "device": device_label(),
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "model": self.engine_model[0] if self.engine_model else None,
            "current_task": self.current_task,
            "loads": self.stats.loads,
            "load_seconds": self.stats.load_seconds,
            "tasks": self.stats.tasks,
            "images": self.stats.images,
            "render_seconds": round(self.stats.render_seconds, 3),
        }

    def heartbeat_once(self) -> None:
        self.registry.publish(self.name, self.inventory(), ttl=self.config.worker_ttl)

    def start_heartbeat(self, interval: float | None = None) -> None:
        interval = interval or max(1.0, self.config.worker_ttl / 3)

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.heartbeat_once()
                except redis.RedisError as exc:  # keep beating once Redis is back
                    log.warning("heartbeat failed: %s", exc)
                self._stop.wait(interval)

        self._beat = threading.Thread(target=loop, name="farm-heartbeat", daemon=True)
        self._beat.start()

    def shutdown(self) -> None:
        self._stop.set()
        try:
            self.registry.remove(self.name)
        except redis.RedisError:
            pass
