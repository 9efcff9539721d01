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
