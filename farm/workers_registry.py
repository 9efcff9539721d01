"""Worker inventory in Redis: what each worker process is, has loaded and is doing.

Each worker refreshes ``<ns>:worker:<name>`` (JSON, with a TTL) every few seconds; an
entry that is not refreshed expires, which is how the farm learns a worker is gone.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis


class WorkerRegistry:
    def __init__(self, client: redis.Redis, namespace: str = "farm"):
        self.r = client
        self.ns = namespace
        self.index = f"{namespace}:workers"

    def _key(self, name: str) -> str:
        return f"{self.ns}:worker:{name}"

    def publish(self, name: str, info: dict[str, Any], ttl: int) -> None:
        now = time.time()
        body = json.dumps({**info, "name": name, "last_seen": now})
        pipe = self.r.pipeline(transaction=False)
        pipe.set(self._key(name), body, ex=max(1, ttl))
        pipe.zadd(self.index, {name: now})
        pipe.execute()

    def remove(self, name: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(self._key(name))
        pipe.zrem(self.index, name)
        pipe.execute()

    def live(self) -> list[dict[str, Any]]:
        names = [
            n.decode() if isinstance(n, bytes) else n for n in self.r.zrange(self.index, 0, -1)
        ]
        if not names:
            return []
        out = []
        stale = []
        for name, raw in zip(names, self.r.mget([self._key(n) for n in names]), strict=True):
            if raw is None:
                stale.append(name)
            else:
                out.append(json.loads(raw))
        if stale:
            self.r.zrem(self.index, *stale)
        return out


class Assignments:
    """Which model each worker serves, decided by the scheduler and applied by the worker
    itself (it polls its entry), so a restart of either side loses nothing.

    Also kept here: the number of model loads the scheduler decided per worker, and the
    per worker and model failure blocks (expiring)."""

    def __init__(self, client: redis.Redis, namespace: str = "farm"):
        self.r = client
        self.key = f"{namespace}:assign"
        self.loads_key = f"{namespace}:decided_loads"
        self.last_key = f"{namespace}:assign_last"
        self.blocks_key = f"{namespace}:blocks"
        self.fail_prefix = f"{namespace}:fail:"

    def set(self, worker: str, model: str | None, at: float, instance: str = "") -> bool:
        """Assign ``model`` (None: nothing) to ``worker``. Returns whether this decides a
        model load: the worker process ``instance`` was last given another model."""
        if model is None:
            self.r.hdel(self.key, worker)
            return False
        raw = self.r.hget(self.last_key, worker)
        last = json.loads(raw) if raw else {}
        load = (last.get("instance"), last.get("model")) != (instance, model)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.key, worker, json.dumps({"model": model, "at": at}))
        pipe.hset(self.last_key, worker, json.dumps({"instance": instance, "model": model}))
        if load:
            pipe.hincrby(self.loads_key, worker, 1)
        pipe.execute()
        return load

    def get(self, worker: str) -> tuple[str, float] | None:
        raw = self.r.hget(self.key, worker)
        if raw is None:
            return None
        d = json.loads(raw)
        return d["model"], float(d["at"])

    def all(self) -> dict[str, tuple[str, float]]:
        out = {}
        for k, v in self.r.hgetall(self.key).items():
            d = json.loads(v)
            out[k.decode() if isinstance(k, bytes) else k] = (d["model"], float(d["at"]))
        return out

    def remove(self, worker: str) -> None:
        self.r.hdel(self.key, worker)

    def decided_loads(self) -> dict[str, int]:
        return {
            (k.decode() if isinstance(k, bytes) else k): int(v)
            for k, v in self.r.hgetall(self.loads_key).items()
        }

    def record_failure(
        self, worker: str, model: str, limit: int, window_s: float, block_s: float
    ) -> bool:
        """Count a failure of ``model`` on ``worker``; after ``limit`` failures within
        ``window_s`` the pair is blocked for ``block_s``. True if it is blocked now."""
        key = f"{self.fail_prefix}{worker}|{model}"
        pipe = self.r.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, max(1, int(window_s)), nx=True)
        count = int(pipe.execute()[0])
        if count >= limit:
            self.r.zadd(self.blocks_key, {f"{worker}|{model}": time.time() + block_s})
            self.r.delete(key)
            return True
        return False

    def blocked(self, now: float | None = None) -> dict[str, set[str]]:
        now = time.time() if now is None else now
        self.r.zremrangebyscore(self.blocks_key, "-inf", now)
        out: dict[str, set[str]] = {}
        for member in self.r.zrange(self.blocks_key, 0, -1):
            worker, _, model = (member.decode() if isinstance(member, bytes) else member).partition(
                "|"
            )
            out.setdefault(worker, set()).add(model)
        return out


class Backlog:
    """The work each model has left, as the leading scheduler saw it at its last round:
    images not yet done or failed, the render seconds they cost at the workers' measured
    speed, and the workers assigned to the model. Written whole each round, and it
    expires (``ttl``) when no scheduler leads, so a reader never takes old figures for
    current ones. What the metrics show for scaling a farm to its work."""

    def __init__(self, client: redis.Redis, namespace: str = "farm"):
        self.r = client
        self.key = f"{namespace}:backlog"

    def publish(self, per_model: dict[str, dict[str, float]], ttl: float) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.key)
        if per_model:
            pipe.hset(self.key, mapping={m: json.dumps(v) for m, v in per_model.items()})
            pipe.pexpire(self.key, max(1, int(ttl * 1000)))
        pipe.execute()

    def read(self) -> dict[str, dict[str, float]]:
        return {
            (k.decode() if isinstance(k, bytes) else k): json.loads(v)
            for k, v in self.r.hgetall(self.key).items()
        }
