"""The farm's Prometheus metrics, served by the API at ``/metrics``.

Everything is read from Redis at scrape time by one collector on the app's own registry:
the API keeps no counts of its own, so every replica answers the same. The ledger's
totals are counted by its scripts when a bit flips (``farm.jobs``), so they are exact
whatever ran twice. A scrape costs four round trips: the ledger's counts (one script,
one field set read per active job), the worker inventories (two: names, then bodies) and
the scheduler's lease, loads and per-model backlog. When Redis does not answer, the
scrape still succeeds and says ``farm_redis_up 0``, so that an alert can fire.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.responses import Response

from farm.jobs import ERROR_STAGES, STATES, FarmCounts, Ledger
from farm.workers_registry import Assignments, Backlog, WorkerRegistry

if TYPE_CHECKING:
    from farm.api.app import Farm

log = logging.getLogger("farm.api")

TIERS = ("vram", "ram", "disk")  # where a worker's inventory lists its models


class FarmCollector:
    """Reads the farm's state from Redis each time it is collected."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.r = client
        self.ledger = Ledger(client, namespace)
        self.workers = WorkerRegistry(client, namespace)
        self.assignments = Assignments(client, namespace)
        self.backlog = Backlog(client, namespace)
        self.leader_key = f"{namespace}:scheduler:leader"  # scheduler.service.Lease

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.ledger.counts()
            workers = self.workers.live()
            pipe = self.r.pipeline(transaction=False)
            pipe.exists(self.leader_key)
            pipe.hgetall(self.assignments.loads_key)
            pipe.hgetall(self.backlog.key)
            leader, loads, backlog = pipe.execute()
        except redis.RedisError as exc:
            log.warning("metrics: redis is unavailable: %s: %s", type(exc).__name__, exc)
            yield GaugeMetricFamily("farm_redis_up", "1 if Redis answered this scrape", 0)
            return
        yield GaugeMetricFamily("farm_redis_up", "1 if Redis answered this scrape", 1)
        yield from _ledger_metrics(counts)
        yield from _worker_metrics(workers)
        yield GaugeMetricFamily(
            "farm_scheduler_leader", "1 if a scheduler holds the leader lease", int(leader)
        )
        decided = CounterMetricFamily(
            "farm_scheduler_model_loads",
            "model loads the scheduler decided, per worker",
            labels=["worker"],
        )
        for worker, n in sorted((_s(k), int(v)) for k, v in loads.items()):
            decided.add_metric([worker], n)
        yield decided
        yield from _backlog_metrics({_s(k): json.loads(v) for k, v in backlog.items()})


def _backlog_metrics(backlog: dict[str, dict[str, float]]) -> Iterator[Metric]:
    """Each model's work left as the leading scheduler last saw it (none when no scheduler
    leads: the record expires): what a farm scales its workers by."""
    images = GaugeMetricFamily(
        "farm_model_backlog_images",
        "images of queued and running jobs not yet done or failed, per model",
        labels=["model"],
    )
    seconds = GaugeMetricFamily(
        "farm_model_backlog_seconds",
        "render seconds those images cost at the workers' measured speed, per model",
        labels=["model"],
    )
    workers = GaugeMetricFamily(
        "farm_model_workers", "workers the scheduler assigned to the model", labels=["model"]
    )
    for model, left in sorted(backlog.items()):
        images.add_metric([model], float(left.get("images", 0)))
        seconds.add_metric([model], float(left.get("seconds", 0.0)))
        workers.add_metric([model], float(left.get("workers", 0)))
    yield from (images, seconds, workers)


def _ledger_metrics(c: FarmCounts) -> Iterator[Metric]:
    t = c.totals
    jobs = GaugeMetricFamily("farm_jobs", "jobs in each state", labels=["state"])
    for state in STATES:
        jobs.add_metric([state], c.jobs.get(state, 0))
    yield jobs
    yield GaugeMetricFamily(
        "farm_images_outstanding",
        "images of queued and running jobs neither done nor failed",
        c.images_outstanding,
    )
    images = CounterMetricFamily(
        "farm_images",
        "images done, and image failures (an image failing again after a retry counts again)",
        labels=["outcome"],
    )
    per_model = CounterMetricFamily(
        "farm_model_images",
        "images done and failed per model (jobs submitted before these counts: totals only)",
        labels=["model", "outcome"],
    )
    for outcome in ("done", "failed"):
        field = f"images_{outcome}"
        images.add_metric([outcome], t.get(field, 0))
        for key in sorted(t):
            if key.startswith(field + ":"):
                per_model.add_metric([key[len(field) + 1 :], outcome], t[key])
    yield images
    yield per_model
    yield CounterMetricFamily(
        "farm_images_retried", "failed images sent to render again", t.get("images_retried", 0)
    )
    yield CounterMetricFamily("farm_jobs_submitted", "jobs submitted", t.get("jobs_submitted", 0))
    yield CounterMetricFamily(
        "farm_task_runs", "task runs begun (a task run again counts again)", t.get("task_runs", 0)
    )
    yield CounterMetricFamily(
        "farm_tasks_finished", "tasks finished, each once", t.get("tasks_finished", 0)
    )
    errors = CounterMetricFamily(
        "farm_task_errors", "failed task runs and model loads, by stage", labels=["stage"]
    )
    for stage in ERROR_STAGES:
        errors.add_metric([stage], t.get(f"errors:{stage}", 0))
    yield errors


def _worker_metrics(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    def gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=["worker", *labels])

    def counter(name: str, doc: str) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, labels=["worker"])

    up = GaugeMetricFamily("farm_workers", "live workers (heartbeat not expired)", len(workers))
    info = gauge("farm_worker_info", "1 per live worker: its device and node", "device", "node")
    total = gauge("farm_worker_vram_total_bytes", "GPU memory of the worker's device")
    free = gauge("farm_worker_vram_free_bytes", "free GPU memory of the worker's device")
    busy = gauge("farm_worker_busy", "1 while the worker renders a task")
    seen = gauge("farm_worker_last_seen_timestamp_seconds", "the worker's last heartbeat")
    resident = gauge(
        "farm_worker_model_info", "1 per model the worker holds, by tier", "model", "tier"
    )
    per_process = (  # inventory field, family: counted since the worker process started
        ("tasks", counter("farm_worker_tasks", "tasks the worker process rendered")),
        ("images", counter("farm_worker_images", "images the worker process rendered")),
        ("render_seconds", counter("farm_worker_render_seconds", "seconds spent rendering")),
        ("loads", counter("farm_worker_model_loads", "model loads of the worker process")),
    )
    for w in sorted(workers, key=lambda w: str(w.get("name", ""))):
        name = str(w.get("name", ""))
        info.add_metric([name, str(w.get("device") or ""), str(w.get("node") or "")], 1)
        for family, field in ((total, "vram_total"), (free, "vram_free"), (seen, "last_seen")):
            if (v := _num(w.get(field))) is not None:
                family.add_metric([name], v)
        busy.add_metric([name], 1 if w.get("current_task") else 0)
        models = w.get("models")
        if isinstance(models, dict):
            for tier in TIERS:
                held = models.get(tier)
                if isinstance(held, list):
                    for model in sorted({str(m) for m in held}):
                        resident.add_metric([name, model, tier], 1)
        for field, family in per_process:
            if (v := _num(w.get(field))) is not None:
                family.add_metric([name], v)
    yield from (up, info, total, free, busy, seen, resident)
    yield from (family for _, family in per_process)


def _num(v: Any) -> float | None:
    """A number the inventory holds, or None (absent, null, or not a number)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def install(app: FastAPI, farm: Farm) -> None:
    """Serve ``/metrics`` from a registry of the app's own (not the process-wide one, so
    several apps in one process each read their own farm). Left out of the OpenAPI
    schema: the answer is Prometheus text, not JSON."""
    registry = CollectorRegistry()
    registry.register(FarmCollector(farm.redis, farm.config.namespace))

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
