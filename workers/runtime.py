"""What one worker process holds: its device, the loaded model, Redis and storage.

A worker keeps one model loaded between tasks and loads another only when a task asks
for it. Model files, and the LoRA files of the tasks, come from the model store into a
node-local cache directory.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from farm.celery_app import model_queue
from farm.config import Config
from farm.jobs import RUNNABLE, JobNotFound, Ledger, error_text
from farm.models import EMBEDDING, LORA, ModelEntry, ModelRegistry, lora_hash
from farm.redis_client import connect
from farm.spec import FEATURES
from farm.workers_registry import Assignments, WorkerRegistry
from storage import StorageError, open_store
from storage.models import ModelStore
from workers.watchdog import Stall, Watchdog

log = logging.getLogger("farm.worker")

# errors that mean Redis is away for now (down, restarting, loading its data, a replica not
# promoted yet), not that a model or an image is bad: what meets one is tried again later
REDIS_AWAY = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)

# the exit status of a worker process that ended itself because its work hung
STALL_EXIT = 70  # EX_SOFTWARE


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
    # seconds per image by "model:WxH:steps", moving average
    image_seconds: dict[str, float] = field(default_factory=dict)

    def record_render(self, key: str, seconds: float, images: int) -> None:
        per = seconds / max(1, images)
        old = self.image_seconds.get(key)
        self.image_seconds[key] = per if old is None else 0.7 * old + 0.3 * per
        self.render_seconds += seconds


class Runtime:
    def __init__(self, config: Config, name: str | None = None):
        self.config = config
        self.name = name or f"{device_label()}@{socket.gethostname()}"
        self.r = connect(config)
        self.ledger = Ledger(self.r, config.namespace)
        self.models = ModelRegistry(self.r, config.namespace)
        self.registry = WorkerRegistry(self.r, config.namespace)
        self.store = open_store(config.storage_url)
        self.model_store = ModelStore(self.store, config.model_cache)
        self.assignments = Assignments(self.r, config.namespace)
        self.instance = f"{self.name}#{uuid.uuid4().hex[:8]}"
        self.device = worker_device()
        self.engine: Any = None
        self.engine_model: tuple[str, str] | None = None  # (name, sha256)
        # engines parked in host RAM (moved off the GPU), most recent last
        self.parked: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.ram_models = int(os.environ.get("FARM_RAM_MODELS", "1"))
        self.current_task: str | None = None
        self.task_thread: int | None = None  # the thread that runs current_task
        self.assigned: str | None = None  # model queue this worker consumes now
        # model -> when a switch to it first found the store away (see _switch)
        self.store_away_since: dict[str, float] = {}
        self.lora_hashes: dict[str, str] = {}  # sha256 of a LoRA file -> its A1111 hash
        self.stats = Stats()
        self.watchdog = Watchdog(config.stall_timeout)
        from storage.s3 import S3Store

        if isinstance(self.store, S3Store):
            # an S3 call retries inside boto3 (up to 5 attempts, each under its own
            # timeouts): each attempt is progress, so that only a call that never returns
            # looks hung, and a store that is merely slow or away is left to put_waiting
            self.store.client.meta.events.register("before-send.s3", self._store_attempt)
        self._lock = threading.Lock()
        self._beat: threading.Thread | None = None
        self._watch: threading.Thread | None = None
        self._dog: threading.Thread | None = None
        self._stop = threading.Event()
        # set when the worker begins to shut down: a task waiting for Redis gives up
        self.stopping = threading.Event()
        self._app: Any = None

    # model handling
    def engine_for(self, model: str) -> Any:
        entry = self.models.get(model)
        if entry is None:
            raise LookupError(f"model {model!r} is not registered")
        if not entry.is_checkpoint:
            raise ValueError(f"{model!r} is {entry.kind}, not a model a worker can load")
        ident = (entry.name, entry.sha256)
        with self._lock:
            if self.engine is not None and self.engine_model == ident:
                return self.engine
            if entry.engine != "synthetic":
                # the engine's code (torch, diffusers) takes seconds to import the first
                # time, reporting no progress: that is not part of the watched load
                from workers.engine.loader import import_libraries

                import_libraries(entry.engine)
            with self.watchdog.stage(f"loading model {entry.name}", entry.name) as tick:
                self._park()
                t0 = time.perf_counter()
                engine = self.parked.pop(ident, None)
                if engine is not None:
                    engine = _move(engine, self.device)
                else:
                    engine = self._load(entry, tick)
            dt = time.perf_counter() - t0
            self.engine, self.engine_model = engine, ident
            self.stats.loads += 1
            self.stats.load_seconds[entry.name] = dt
            log.info("%s loaded model %s in %.2f s", self.name, entry.name, dt)
            self.ledger.event(
                {
                    "type": "model-loaded",
                    "worker": self.name,
                    "model": entry.name,
                    "seconds": f"{dt:.3f}",
                }
            )
            return engine

    def _park(self) -> None:
        """Move the loaded engine to host RAM (keeping at most ``ram_models`` there)."""
        if self.engine is not None and self.engine_model is not None and self.ram_models > 0:
            self.parked[self.engine_model] = _move(self.engine, "cpu")
            while len(self.parked) > self.ram_models:
                self.parked.popitem(last=False)
        self.engine = None
        self.engine_model = None

    def _load(self, entry: ModelEntry, progress: Callable[..., object] | None = None) -> Any:
        if entry.engine == "synthetic":
            from workers.engine.synthetic import SyntheticEngine

            return SyntheticEngine()
        from workers.engine.loader import load_engine

        path = self.fetch_file(entry, progress)
        return load_engine(path, device=self.device, progress=progress)

    def fetch_file(self, entry: ModelEntry, progress: Callable[..., object] | None = None) -> Path:
        """The entry's file in this node's cache, downloaded (and checked) from the model
        store the first time; ``progress`` as ``ModelStore.fetch``."""
        return self.model_store.fetch(entry.sha256, progress=progress)

    def lora_file(
        self, name: str, progress: Callable[..., object] | None = None
    ) -> tuple[Path, str]:
        """The local file of the registered LoRA ``name``, fetched like a checkpoint, and
        its A1111 hash (worked out once per file)."""
        entry = self.models.get(name)
        if entry is None:
            raise LookupError(f"LoRA {name!r} is not registered")
        if entry.engine != LORA:
            raise ValueError(f"{name!r} is {entry.kind}, not a LoRA")
        path = self.fetch_file(entry, progress)
        if entry.sha256 not in self.lora_hashes:
            self.lora_hashes[entry.sha256] = lora_hash(path)
        return path, self.lora_hashes[entry.sha256]

    def embedding_file(
        self, name: str, family: str, progress: Callable[..., object] | None = None
    ) -> tuple[Path, ModelEntry] | None:
        """The local file of the registered embedding ``name``, fetched like a checkpoint,
        and its entry; None when it was made for another family than ``family``."""
        entry = self.models.get(name)
        if entry is None:
            raise LookupError(f"embedding {name!r} is not registered")
        if entry.engine != EMBEDDING:
            raise ValueError(f"{name!r} is {entry.kind}, not an embedding")
        if entry.family != family:
            return None
        return self.fetch_file(entry, progress), entry

    # inventory / heartbeat
    def inventory(self) -> dict[str, Any]:
        vram_total, vram_free = _vram(self.device)
        return {
            "instance": self.instance,
            "device": device_label(),
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "vram_total": vram_total,
            "vram_free": vram_free,
            "model": self.engine_model[0] if self.engine_model else None,
            "assigned": self.assigned,
            "models": {
                "vram": [self.engine_model[0]] if self.engine_model else [],
                "ram": [name for name, _ in self.parked],
                "disk": self._disk_models(),
            },
            "current_task": self.current_task,
            "features": list(FEATURES),  # what it renders beyond txt2img (farm.spec)
            "loads": self.stats.loads,
            "load_seconds": self.stats.load_seconds,
            "image_seconds": self.stats.image_seconds,
            "tasks": self.stats.tasks,
            "images": self.stats.images,
            "render_seconds": round(self.stats.render_seconds, 3),
        }

    def _disk_models(self) -> list[str]:
        try:
            entries = self.models.list()
        except redis.RedisError:
            return []
        return [
            e.name
            for e in entries
            if e.sha256 and e.is_checkpoint and self.model_store.is_cached(e.sha256)
        ]

    # model assignment: the scheduler writes it, the worker applies it
    def watch_assignment(self, consumer: Any, interval: float = 0.5) -> None:
        """Follow this worker's assignment: switch the Celery consumer to the assigned
        model's queue, loading the model first so the first task does not wait. A consumer
        that does not consume what it should (a broker reconnect came between) is set
        right again."""

        def loop() -> None:
            asked = -math.inf
            while not self._stop.is_set():
                try:
                    got = self.assignments.get(self.name)
                    model = got[0] if got else None
                    if model != self.assigned:
                        self._switch(consumer, model)
                    elif self.consumed(consumer) != self.wanted() and (
                        time.monotonic() - asked > 5.0
                    ):
                        asked = time.monotonic()
                        consumer.call_soon(self.apply_queues, consumer)
                except (*REDIS_AWAY, StorageError) as exc:  # away for now: retry
                    log.warning("applying the assignment failed: %s", exc)
                    self._stop.wait(2.0)
                except Exception:  # noqa: BLE001 - keep following; log and retry
                    log.exception("applying the assignment failed")
                    self._stop.wait(2.0)
                self._stop.wait(interval)

        self._watch = threading.Thread(target=loop, name="farm-assignment", daemon=True)
        self._watch.start()

    def _switch(self, consumer: Any, model: str | None) -> None:
        self.assigned = None
        consumer.call_soon(self.apply_queues, consumer)  # off the old model's queue at once
        if model is None:
            log.info("%s: no model assigned", self.name)
            return
        try:
            self.engine_for(model)
        except Exception as exc:  # noqa: BLE001 - a broken model must not stop the worker
            if isinstance(exc, REDIS_AWAY):
                raise  # not the model's fault: the watcher switches again once Redis is back
            if isinstance(exc, StorageError) and exc.transient:
                # not the model's fault either, for FARM_STORAGE_WAIT seconds: the watcher
                # tries again. A store this worker cannot reach for longer counts as any
                # load failure, so that the model goes to workers that can load it.
                since = self.store_away_since.setdefault(model, time.monotonic())
                if time.monotonic() - since < self.config.storage_wait:
                    raise
                del self.store_away_since[model]  # a later switch waits afresh
            log.error("%s: cannot load %s: %s", self.name, model, exc)
            self.record_failure(model)
            self.record_model_error(model, "load", error_text(exc))
        else:
            self.store_away_since.pop(model, None)
        self.assigned = model
        consumer.call_soon(self.apply_queues, consumer)
        log.info("%s: serving model %s", self.name, model)
        self.heartbeat_once()

    def wanted(self) -> set[str]:
        """The model queues this worker should consume: its assigned model's, if any."""
        return {model_queue(self.config.namespace, self.assigned)} if self.assigned else set()

    def consumed(self, consumer: Any) -> set[str]:
        """The model queues the Celery consumer consumes now."""
        prefix = model_queue(self.config.namespace, "")
        queues = getattr(consumer.task_consumer, "queues", None) or []
        return {q.name for q in queues if q.name.startswith(prefix)}

    def apply_queues(self, consumer: Any) -> None:
        """Run by the consumer's own loop: consume the assigned model's queue and no other
        model's. It reads the assignment when it runs, so callbacks that run late, twice or
        out of order (Celery's event loop keeps them in a set) all end the same way."""
        want, have = self.wanted(), self.consumed(consumer)
        for queue in sorted(have - want):
            consumer.cancel_task_queue(queue)
        for queue in sorted(want - have):
            consumer.add_task_queue(queue, queue, "direct", queue)

    def forward(self, msg: Any, model: str, priority: int) -> None:
        from farm.celery_app import make_app, send_render

        if self._app is None:
            self._app = make_app(self.config)
        send_render(self._app, msg, model, priority)

    def record_failure(self, model: str) -> None:
        c = self.config
        if self.assignments.record_failure(
            self.name, model, c.fail_limit, c.fail_window, c.fail_block
        ):
            log.warning(
                "%s: %s failed %d times; blocked for %s s",
                self.name,
                model,
                c.fail_limit,
                c.fail_block,
            )

    def wait_for_redis(self, limit_s: float, settle_s: float = 0.0) -> bool:
        """Wait ``settle_s``, then until Redis answers; False if the worker begins to shut
        down or ``limit_s`` passes first."""
        deadline = time.monotonic() + limit_s
        pause = 0.5
        if self.stopping.wait(settle_s):
            return False
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                self.r.ping()
                return True
            except redis.RedisError:
                self.stopping.wait(pause)
                pause = min(5.0, pause * 2)
        return False

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

    # hang detection: see workers.watchdog
    def _store_attempt(self, **_: Any) -> None:
        self.watchdog.tick_here()  # returns None: botocore sends the request as usual

    def start_watchdog(self, interval: float | None = None) -> None:
        """Check every few seconds that no stage of work has stalled; on a stall, end the
        process (``on_stall``). Nothing starts when FARM_STALL_TIMEOUT is 0."""
        limit = self.watchdog.limit_s
        if limit <= 0:
            return
        interval = interval or min(5.0, max(0.2, limit / 5))

        def loop() -> None:
            while not self._stop.wait(interval):
                stall = self.watchdog.stalled()
                if stall is not None:
                    self.on_stall(stall)

        self._dog = threading.Thread(target=loop, name="farm-watchdog", daemon=True)
        self._dog.start()

    def on_stall(self, stall: Stall) -> None:
        """A stage of work hung: nothing this process does can free its device or finish
        the task, so it ends with STALL_EXIT and the launcher starts it again. First it
        says where it hung (the stuck thread's stack, in the log), counts a failure
        against the model it worked with (a model that hangs every time is kept off this
        worker like one that fails to load), records the hang in the failures of the job
        it holds up (see ``_record_stall``), and leaves the inventory, so that the
        scheduler hands its task to another worker at once rather than when the heartbeat
        expires."""
        log.error(
            "%s: %s made no progress for %.0f s (FARM_STALL_TIMEOUT=%s); the worker process "
            "ends and its task goes to another worker",
            self.name,
            stall.what,
            stall.seconds,
            self.config.stall_timeout,
        )
        frame = sys._current_frames().get(stall.thread)
        if frame is not None:
            log.error("where it hangs:\n%s", "".join(traceback.format_stack(frame)).rstrip())
        self.stopping.set()
        self._stop.set()
        if self._beat is not None:  # a beat under way would publish the inventory again
            self._beat.join(self.config.redis_timeout)
        try:
            self.ledger.event(
                {
                    "type": "worker-stalled",
                    "worker": self.name,
                    "instance": self.instance,
                    "stage": stall.what,
                    "model": stall.model or "",
                    "task": self.current_task or "",
                    "seconds": f"{stall.seconds:.1f}",
                }
            )
            if stall.model:
                self.record_failure(stall.model)
            try:
                self._record_stall(stall)
            except redis.RedisError:
                raise
            except Exception as exc:  # noqa: BLE001 - the process ends whatever fails here
                log.warning("could not record the stall in the job: %s", exc)
            self.registry.remove(self.name)
        except redis.RedisError as exc:  # the heartbeat expires instead
            log.warning("could not report the stall: %s", exc)
        logging.shutdown()
        os._exit(STALL_EXIT)  # the stuck thread cannot be stopped; the process can

    def _record_stall(self, stall: Stall) -> None:
        """Keep the hang in the failures of the job it holds up: the task's, if the task's
        own thread hung, else (a model loading ahead of its tasks) those of the jobs that
        wait for the model. A job whose model hangs every worker waits with nothing
        failed, and this is where it says why."""
        text = (
            f"no progress for {stall.seconds:.0f} s while {stall.what} "
            f"(FARM_STALL_TIMEOUT={self.config.stall_timeout:g}); the worker process ended"
        )
        current = self.current_task
        if current is None or stall.thread != self.task_thread:
            if stall.model:
                self.record_model_error(stall.model, "hang", text)
            return
        job_id, _, task_no = current.partition("/")
        try:
            plan = self.ledger.get(job_id).plan
        except JobNotFound:
            return
        task = plan.task(int(task_no))
        self.ledger.record_error(
            job_id,
            task.task_no,
            task.images,
            stage="hang",
            error=text,
            worker=self.name,
            model=stall.model or plan.task_model(task.task_no),
            images_failed=False,
        )

    def record_model_error(self, model: str, stage: str, error: str, most: int = 50) -> None:
        """A load of ``model`` ahead of its tasks (on a switch of assignment) failed or
        hung: tell the unfinished jobs that render with it (the oldest ``most``), whose
        tasks may now wait for a worker that can hold it. Their entries name no task."""
        told = 0
        for job in self.ledger.active():
            if told >= most:
                break
            if job.state in RUNNABLE and model in job.plan.models():
                told += self.ledger.record_error(
                    job.id, None, (), stage=stage, error=error, worker=self.name,
                    model=model, images_failed=False,
                )  # fmt: skip

    def shutdown(self) -> None:
        self.stopping.set()
        self._stop.set()
        try:
            self.registry.remove(self.name)
        except redis.RedisError:
            pass


def _move(engine: Any, device: str) -> Any:
    """Move an engine's torch modules to ``device``: setting a TorchEngine's ``device``
    moves every one of them (no-op for engines without a device)."""
    if hasattr(engine, "device"):
        engine.device = device
    return engine


def _vram(device: str) -> tuple[int | None, int | None]:
    if not device.startswith("cuda"):
        return None, None
    try:
        import torch

        free, total = torch.cuda.mem_get_info()
        return int(total), int(free)
    except Exception:  # noqa: BLE001 - inventory is best effort
        return None, None
