"""Job ledger in Redis.

Per job (all keys under the farm's namespace ``<ns>:``)::

    job:<id>          hash: spec, state, counters, timestamps
    job:<id>:done     bitmap, bit k set once image k is stored
    job:<id>:failed   bitmap, bit k set when image k failed (cleared if it later succeeds)
    job:<id>:tasks    bitmap, bit t set once task t has finished (or was skipped)
    job:<id>:errors   list, newest first, of why runs of its tasks failed (the last 100)
    jobs              zset of all job ids by creation time
    active            zset of jobs the scheduler still releases tasks for, by creation time
    ended:<state>     zset of the jobs that ended in done, failed or cancelled
    stats             hash of the farm's totals (images done and failed, per model too,
                      jobs submitted, failed runs per stage, ...) for its metrics
    events            stream of progress events

Counters change only inside Lua scripts and only when a bit flips, so a task that runs
twice (a redelivery after a crash) counts nothing twice.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from farm.spec import JobSpec, Plan

STATES = ("queued", "running", "paused", "done", "failed", "cancelled")
TERMINAL = ("done", "failed", "cancelled")
RUNNABLE = ("queued", "running")
EVENTS_MAXLEN = 100_000
ERRORS_KEPT = 100  # failures kept per job, newest first (the job counts them all)
ERROR_CHARS = 1000  # of an error's text
ERROR_STAGES = ("load", "render", "store", "hang", "lost")

# KEYS: job, done, failed, active, events, ended:done, ended:failed, stats
# ARGV: ok, now, job_id, index...
# The farm's totals (``stats``) count the bits that flip here: an image done, an image
# failed (again after a retry, if it fails again), each by the model that rendered it,
# read from the job's 'model_layout' (a job from before it counts in the totals only).
_MARK = """
local done_d, failed_d = 0, 0
local ok = ARGV[1] == '1'
local layout, by_model = false, {}
local function count_model(k)
  if layout == false then
    local raw = redis.call('HGET', KEYS[1], 'model_layout')
    layout = raw and cjson.decode(raw) or nil
  end
  if layout then
    local cell = math.floor(k / layout.per_cell)
    local m = layout.models[math.floor(cell / layout.stride) % #layout.models + 1]
    by_model[m] = (by_model[m] or 0) + 1
  end
end
for i = 4, #ARGV do
  local k = tonumber(ARGV[i])
  if ok then
    if redis.call('SETBIT', KEYS[2], k, 1) == 0 then
      done_d = done_d + 1
      count_model(k)
      if redis.call('SETBIT', KEYS[3], k, 0) == 1 then failed_d = failed_d - 1 end
    end
  else
    if redis.call('GETBIT', KEYS[2], k) == 0 and redis.call('SETBIT', KEYS[3], k, 1) == 0 then
      failed_d = failed_d + 1
      count_model(k)
    end
  end
end
local outcome = ok and 'images_done' or 'images_failed'
local flipped = ok and done_d or failed_d
if flipped > 0 then
  redis.call('HINCRBY', KEYS[8], outcome, flipped)
  for m, n in pairs(by_model) do redis.call('HINCRBY', KEYS[8], outcome .. ':' .. m, n) end
end
local done = redis.call('HINCRBY', KEYS[1], 'done', done_d)
local failed = redis.call('HINCRBY', KEYS[1], 'failed', failed_d)
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
local state = redis.call('HGET', KEYS[1], 'state')
if done_d ~= 0 or failed_d ~= 0 then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', '100000', '*',
    'type', 'progress', 'job', ARGV[3], 'done', done, 'failed', failed, 'total', total)
  if done + failed >= total and state ~= 'done' and state ~= 'failed'
      and state ~= 'cancelled' then
    if failed > 0 then state = 'failed' else state = 'done' end
    redis.call('HSET', KEYS[1], 'state', state, 'finished_at', ARGV[2])
    redis.call('ZREM', KEYS[4], ARGV[3])
    local ended = KEYS[6]
    if state == 'failed' then ended = KEYS[7] end
    redis.call('ZADD', ended, redis.call('HGET', KEYS[1], 'created_at'), ARGV[3])
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', '100000', '*',
      'type', 'job-' .. state, 'job', ARGV[3])
  end
end
return {done_d, failed_d, done, failed, state}
"""

# KEYS: job, events, requeue, running, pending, stats
# ARGV: task_no, worker, now, job_id, instance
_CLAIM = """
redis.call('ZREM', KEYS[5], ARGV[1])
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'paused' then
  -- give the task back: it is released again on resume
  if redis.call('ZADD', KEYS[3], 'NX', tonumber(ARGV[1]), ARGV[1]) == 1 then
    if tonumber(redis.call('HGET', KEYS[1], 'inflight')) > 0 then
      redis.call('HINCRBY', KEYS[1], 'inflight', -1)
    end
  end
  return 'paused'
end
if state ~= 'queued' and state ~= 'running' then return state or 'missing' end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[3])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', '100000', '*', 'type', 'job-running',
    'job', ARGV[4])
end
redis.call('HINCRBY', KEYS[1], 'tasks_started', 1)
redis.call('HINCRBY', KEYS[6], 'task_runs', 1)
redis.call('HSET', KEYS[4], ARGV[4] .. '/' .. ARGV[1], ARGV[5])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', '100000', '*', 'type', 'task-started',
  'job', ARGV[4], 'task', ARGV[1], 'worker', ARGV[2])
return 'ok'
"""

# KEYS: running   ARGV: job_id/task_no, instance
_FORGET_CLAIM = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

# KEYS: job, tasks, wake, running, events, stats   ARGV: task_no, job_id
_FINISH_TASK = """
redis.call('HDEL', KEYS[4], ARGV[2] .. '/' .. ARGV[1])
if redis.call('SETBIT', KEYS[2], tonumber(ARGV[1]), 1) == 0 then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', '100000', '*', 'type', 'task-finished',
    'job', ARGV[2], 'task', ARGV[1])
  redis.call('RPUSH', KEYS[3], 1)
  redis.call('LTRIM', KEYS[3], 0, 0)
  if tonumber(redis.call('HGET', KEYS[1], 'inflight')) > 0 then
    redis.call('HINCRBY', KEYS[1], 'inflight', -1)
  end
  redis.call('HINCRBY', KEYS[6], 'tasks_finished', 1)
  return redis.call('HINCRBY', KEYS[1], 'tasks_finished', 1)
end
return -1
"""

# KEYS: job, requeue, pending   ARGV: n, now, tasks_per_cell, cell...
# Releases up to n tasks of the given cells (those of one model): first the ones given back
# (pause) or to retry, then each cell's next tasks, cell by cell in the order given. A
# cell's cursor ('c:<cell>') is its next task never released; 'cursor' counts the tasks
# released for the first time. The cells below 'full' are all out and have no field: each
# release moves 'full' past the cells that are now all out and drops their fields, so a
# job's hash stays small however many cells its sweep has. Each released task waits in
# ``pending`` (by release time) until a worker claims it.
_RELEASE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return {} end
local n = tonumber(ARGV[1])
local tpc = tonumber(ARGV[3])
local n_tasks = tonumber(redis.call('HGET', KEYS[1], 'n_tasks'))
if not redis.call('HGET', KEYS[1], 'percell') then
  -- a job from before per-cell cursors: its 'cursor' is the next task of all, so tasks
  -- 0..cursor-1 are out: the cells it passed are all out, the one it is in has a cursor
  local pos = tonumber(redis.call('HGET', KEYS[1], 'cursor') or 0)
  local passed = math.floor(pos / tpc)
  if pos > passed * tpc then redis.call('HSET', KEYS[1], 'c:' .. passed, pos) end
  redis.call('HSET', KEYS[1], 'full', passed, 'percell', 1)
end
local full = tonumber(redis.call('HGET', KEYS[1], 'full') or 0)
local out = {}
for i = 4, #ARGV do
  if #out >= n then break end
  local lo = tonumber(ARGV[i]) * tpc
  local back = redis.call('ZRANGEBYSCORE', KEYS[2], lo, lo + tpc - 1, 'LIMIT', 0, n - #out)
  for _, t in ipairs(back) do
    redis.call('ZREM', KEYS[2], t)
    out[#out + 1] = tonumber(t)
  end
end
local fresh = 0
for i = 4, #ARGV do
  if #out >= n then break end
  local cell = tonumber(ARGV[i])
  local lo = cell * tpc
  local field = 'c:' .. ARGV[i]
  local cur = lo + tpc
  if cell >= full then cur = tonumber(redis.call('HGET', KEYS[1], field) or lo) end
  local start = cur
  local limit = math.min(lo + tpc, n_tasks)
  while #out < n and cur < limit do
    out[#out + 1] = cur
    cur = cur + 1
  end
  if cur > start then
    redis.call('HSET', KEYS[1], field, cur)
    fresh = fresh + cur - start
  end
end
if fresh > 0 then
  redis.call('HINCRBY', KEYS[1], 'cursor', fresh)
  local f = full
  while f * tpc < n_tasks do
    local field = 'c:' .. f
    local cur = tonumber(redis.call('HGET', KEYS[1], field) or f * tpc)
    if cur < f * tpc + tpc then break end
    redis.call('HDEL', KEYS[1], field)
    f = f + 1
  end
  if f > full then redis.call('HSET', KEYS[1], 'full', f) end
end
for _, t in ipairs(out) do redis.call('ZADD', KEYS[3], ARGV[2], t) end
if #out > 0 then
  redis.call('HINCRBY', KEYS[1], 'inflight', #out)
  redis.call('HSET', KEYS[1], 'last_release', ARGV[2])
end
return out
"""

# KEYS: job, active, events, ended:<new_state>
# ARGV: job_id, now, new_state, allowed_from (comma list)
_TRANSITION = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
local allowed = false
for s in string.gmatch(ARGV[4], '[^,]+') do if s == state then allowed = true end end
if not allowed then return state end
local to = ARGV[3]
if to == 'resumed' then
  if redis.call('HGET', KEYS[1], 'started_at') then to = 'running' else to = 'queued' end
end
redis.call('HSET', KEYS[1], 'state', to)
if to == 'cancelled' or to == 'done' or to == 'failed' then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[4], redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', '100000', '*', 'type', 'job-' .. to,
  'job', ARGV[1])
return 'ok'
"""

# KEYS: lost   ARGV: task_no, instance
# Per task, the deaths of workers that held it ('<task>') and the last one ('<task>:by').
_LOSE = """
if redis.call('HGET', KEYS[1], ARGV[1] .. ':by') == ARGV[2] then
  return {tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or 0), 0}
end
redis.call('HSET', KEYS[1], ARGV[1] .. ':by', ARGV[2])
return {redis.call('HINCRBY', KEYS[1], ARGV[1], 1), 1}
"""

# KEYS: job, failed, tasks, requeue, active, events, ended:done, ended:failed, stats
# ARGV: job_id, now, n_images, tasks_per_cell, image..., task...
_RETRY = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'running' and state ~= 'failed' and state ~= 'done' and state ~= 'paused'
    and state ~= 'queued' then
  return {state or 'missing', 0}
end
local n_images = tonumber(ARGV[3])
local cleared = 0
local tpc = tonumber(ARGV[4])
local legacy = not redis.call('HGET', KEYS[1], 'percell')
local pos = tonumber(redis.call('HGET', KEYS[1], 'cursor') or 0)
local full = tonumber(redis.call('HGET', KEYS[1], 'full') or 0)
for i = 5, 4 + n_images do
  if redis.call('SETBIT', KEYS[2], tonumber(ARGV[i]), 0) == 1 then cleared = cleared + 1 end
end
if cleared == 0 then return {state, 0} end
redis.call('HINCRBY', KEYS[1], 'failed', -cleared)
redis.call('HINCRBY', KEYS[9], 'images_retried', cleared)
for i = 5 + n_images, #ARGV do
  local t = tonumber(ARGV[i])
  if redis.call('SETBIT', KEYS[3], t, 0) == 1 then
    redis.call('HINCRBY', KEYS[1], 'tasks_finished', -1)
  end
  -- a task its cell's cursor has not reached yet goes out with the cursor anyway
  local cell = math.floor(t / tpc)
  local cur = tonumber(redis.call('HGET', KEYS[1], 'c:' .. cell) or cell * tpc)
  if cell < full then cur = cell * tpc + tpc end  -- all out
  if legacy then cur = pos end  -- a job from before per-cell cursors
  if t < cur then redis.call('ZADD', KEYS[4], t, t) end
end
if state == 'failed' or state == 'done' then
  state = 'running'
  redis.call('HSET', KEYS[1], 'state', state)
  redis.call('HDEL', KEYS[1], 'finished_at')
  redis.call('ZADD', KEYS[5], redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
  redis.call('ZREM', KEYS[7], ARGV[1])
  redis.call('ZREM', KEYS[8], ARGV[1])
end
redis.call('XADD', KEYS[6], 'MAXLEN', '~', '100000', '*', 'type', 'job-retry',
  'job', ARGV[1], 'images', cleared)
return {state, cleared}
"""


# KEYS: jobs, ended:done, ended:failed, ended:cancelled   ARGV: job key prefix, start, count
# Indexes under the state it ended in each ended job among those of rank start ..
# start+count-1 in ``jobs`` (oldest first), for a namespace whose jobs ended before the
# scripts kept that index. One chunk at a time is atomic, and every script that ends a
# job or takes it back keeps the index too, so the index is exact once all chunks ran.
# (The job hashes are named from the prefix: the farm runs on one Redis, not a cluster.)
_INDEX_ENDED = """
local ids = redis.call('ZRANGE', KEYS[1], ARGV[2], ARGV[2] + ARGV[3] - 1, 'WITHSCORES')
local into = {done = KEYS[2], failed = KEYS[3], cancelled = KEYS[4]}
for i = 1, #ids, 2 do
  local state = redis.call('HGET', ARGV[1] .. ids[i], 'state')
  if state and into[state] then redis.call('ZADD', into[state], ids[i + 1], ids[i]) end
end
return #ids / 2
"""

# KEYS: job, requeue, pending   ARGV: 1 to include the spec
# -> {fields and values, tasks given back, tasks released and not claimed}. The spec never
# changes after submit and can be large: the scheduler reads it once per job and keeps it.
_ACTIVE_VIEW = """
local h = redis.call('HGETALL', KEYS[1])
if ARGV[1] ~= '1' then
  local out = {}
  for i = 1, #h, 2 do
    if h[i] ~= 'spec' then
      out[#out + 1] = h[i]
      out[#out + 1] = h[i + 1]
    end
  end
  h = out
end
return {h, redis.call('ZRANGE', KEYS[2], 0, -1), redis.call('ZRANGE', KEYS[3], 0, -1)}
"""

# KEYS: active, ended:done, ended:failed, ended:cancelled, stats   ARGV: job key prefix, now
# -> {state, jobs, ...}, images of runnable jobs neither done nor failed, {stats hash},
# images/s of the running jobs (as text: Redis would cut a Lua number to an integer).
# O(active jobs), one HMGET each, in one call: what a metrics scrape reads of the ledger.
_COUNTS = """
local counts, outstanding, rate = {}, 0, 0
local now = tonumber(ARGV[2])
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local h = redis.call('HMGET', ARGV[1] .. id, 'state', 'total', 'done', 'failed', 'started_at')
  local state = h[1]
  if state == 'queued' or state == 'running' or state == 'paused' then
    counts[state] = (counts[state] or 0) + 1
    if state ~= 'paused' then
      outstanding = outstanding + tonumber(h[2]) - tonumber(h[3]) - tonumber(h[4])
    end
    -- JobRecord.rate: images done since the first task started (a running job has no end)
    local started = h[5] and tonumber(h[5])
    if state == 'running' and started and tonumber(h[3]) > 0 then
      rate = rate + tonumber(h[3]) / math.max(now - started, 1e-6)
    end
  end
end
local out = {}
for state, n in pairs(counts) do
  out[#out + 1] = state
  out[#out + 1] = n
end
for i, state in ipairs({'done', 'failed', 'cancelled'}) do
  out[#out + 1] = state
  out[#out + 1] = redis.call('ZCARD', KEYS[i + 1])
end
return {out, outstanding, redis.call('HGETALL', KEYS[5]), tostring(rate)}
"""

# KEYS: job, errors, stats   ARGV: entry (JSON), kept, stage
_RECORD_ERROR = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
redis.call('HINCRBY', KEYS[3], 'errors:' .. ARGV[3], 1)
return redis.call('HINCRBY', KEYS[1], 'errors', 1)
"""


class JobNotFound(KeyError):
    pass


@dataclass
class FarmCounts:
    """The farm at one moment, as its metrics show it (``Ledger.counts``)."""

    jobs: dict[str, int]  # jobs in each of ``STATES``
    images_outstanding: int  # images of queued and running jobs neither done nor failed
    totals: dict[str, int]  # the ``stats`` hash: 'images_done', 'images_done:<model>',
    # 'images_failed[:<model>]', 'images_retried', 'jobs_submitted', 'task_runs',
    # 'tasks_finished', 'errors:<stage>'; each only ever grows
    images_per_s: float = 0.0  # of the running jobs, each as ``JobRecord.rate``, summed


@dataclass
class JobRecord:
    id: str
    spec: JobSpec
    state: str
    priority: int  # current priority (can change while the job runs)
    total: int
    n_tasks: int
    done: int
    failed: int
    cursor: int  # tasks released for the first time (each cell has its own cursor)
    inflight: int  # tasks in the broker or running
    requeued: int  # tasks given back (pause) or to retry, released before new ones
    tasks_started: int  # runs of tasks begun: a task run again (redelivered, cut off by a
    # Redis outage, retried) counts each run, as its 'task-started' events do
    tasks_finished: int  # tasks finished, each once however often it ran
    created_at: float
    started_at: float | None
    finished_at: float | None
    last_release: float | None = None
    errors: int = 0  # failed runs of its tasks recorded (``Ledger.errors`` has the last)
    extra: dict[str, Any] = field(default_factory=dict)
    cell_cursors: dict[int, int] = field(default_factory=dict)  # cell -> next task never
    # released, for the cells released from at or after ``full_cells`` (others: their first)
    full_cells: int = 0  # the cells below this have every task released
    requeue_tasks: tuple[int, ...] = ()  # the tasks given back (``Ledger.active`` only)
    pending_tasks: tuple[int, ...] = ()  # released, not claimed yet (``Ledger.active`` only)

    @functools.cached_property
    def plan(self) -> Plan:
        return Plan(self.spec, self.extra.get("batch_size"))

    @property
    def outstanding(self) -> int:
        """Tasks released to the broker that have not finished yet."""
        return self.inflight

    @property
    def remaining_tasks(self) -> int:
        """Tasks still to be released."""
        return self.n_tasks - self.cursor + self.requeued

    def rate(self, now: float | None = None) -> float:
        """Images per second since the first task started."""
        if not self.started_at or not self.done:
            return 0.0
        end = self.finished_at or (now or time.time())
        return self.done / max(end - self.started_at, 1e-6)

    def eta(self, now: float | None = None) -> float | None:
        if self.state in TERMINAL:
            return 0.0
        rate = self.rate(now)
        if rate <= 0:
            return None
        return (self.total - self.done - self.failed) / rate

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "model": self.spec.model,
            "priority": self.priority,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "tasks": self.n_tasks,
            "tasks_finished": self.tasks_finished,
            "errors": self.errors,
            "images_per_s": round(self.rate(), 4),
            "eta_s": None if self.eta() is None else round(self.eta() or 0.0, 1),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "seed": self.spec.seed,
            "tags": self.spec.tags,
        }


class Ledger:
    """Jobs, progress and task bookkeeping for one farm namespace."""

    def __init__(self, client: redis.Redis, namespace: str = "farm"):
        self.r = client
        self.ns = namespace
        self._mark = client.register_script(_MARK)
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH_TASK)
        self._forget_claim = client.register_script(_FORGET_CLAIM)
        self._release = client.register_script(_RELEASE)
        self._transition = client.register_script(_TRANSITION)
        self._retry = client.register_script(_RETRY)
        self._lose = client.register_script(_LOSE)
        self._record_error = client.register_script(_RECORD_ERROR)
        self._active_view = client.register_script(_ACTIVE_VIEW)
        self._counts = client.register_script(_COUNTS)
        self._index_ended_chunk = client.register_script(_INDEX_ENDED)
        self._ended_indexed = False
        self._specs: dict[str, JobSpec] = {}  # active job -> its spec (see ``active``)

    # keys
    def key(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    def job_key(self, job_id: str, suffix: str = "") -> str:
        return self.key("job", job_id) + (f":{suffix}" if suffix else "")

    @property
    def events_key(self) -> str:
        return self.key("events")

    @property
    def stats_key(self) -> str:
        """Hash of the farm's totals, each counted once (see ``counts``)."""
        return self.key("stats")

    @property
    def running_key(self) -> str:
        """Hash ``<job>/<task>`` -> worker for every task a worker has claimed and not
        finished: what to hand to another worker when that one dies."""
        return self.key("running")

    @property
    def wake_key(self) -> str:
        """A one-element list the scheduler blocks on: pushed when a job arrives or a
        task finishes, so free broker slots are refilled at once."""
        return self.key("wake")

    def wait_wake(self, timeout: float) -> bool:
        got = self.r.blpop([self.wake_key], timeout=timeout)
        return got is not None

    def wake(self) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.rpush(self.wake_key, 1)
        pipe.ltrim(self.wake_key, 0, 0)
        pipe.execute()

    # jobs
    def create(self, spec: JobSpec, default_batch_size: int | None = None) -> JobRecord:
        spec = spec.resolved()
        plan = Plan(spec, default_batch_size)
        job_id = uuid.uuid4().hex[:16]
        now = time.time()
        mapping = {
            "id": job_id,
            "spec": spec.model_dump_json(),
            "state": "queued",
            "total": plan.total,
            "n_tasks": plan.n_tasks,
            "batch_size": plan.batch_size,
            "priority": spec.priority,
            "done": 0,
            "failed": 0,
            "cursor": 0,
            "percell": 1,  # per-cell cursors ('c:<cell>'); see _RELEASE
            "full": 0,  # cells all out below this; see _RELEASE
            "inflight": 0,
            "tasks_started": 0,
            "tasks_finished": 0,
            "created_at": now,
            "model_layout": json.dumps(plan.model_layout()),  # see _MARK
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.job_key(job_id), mapping=mapping)
        pipe.hincrby(self.stats_key, "jobs_submitted", 1)
        pipe.zadd(self.key("jobs"), {job_id: now})
        pipe.zadd(self.key("active"), {job_id: now})
        pipe.xadd(
            self.events_key,
            {"type": "job-queued", "job": job_id, "total": plan.total},
            maxlen=EVENTS_MAXLEN,
            approximate=True,
        )
        pipe.rpush(self.wake_key, 1)
        pipe.ltrim(self.wake_key, 0, 0)
        pipe.execute()
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.job_key(job_id))
        pipe.zcard(self.job_key(job_id, "requeue"))
        h, requeued = pipe.execute()
        if not h:
            raise JobNotFound(job_id)
        return _record(h, requeued)

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self.job_key(job_id)))

    def ended_key(self, state: str) -> str:
        """Sorted set of the jobs that ended in ``state`` (done, failed, cancelled), by
        submit time, kept by the scripts that end a job or take it back (retry)."""
        return self.key("ended", state)

    def index_ended(self, chunk: int = 1000) -> None:
        """Index the jobs that ended before the scripts kept ``ended_key`` (once per
        namespace; a no-op after that)."""
        if self._ended_indexed:
            return
        marker = self.key("ended", "indexed")
        if not self.r.exists(marker):
            keys = [self.key("jobs"), *(self.ended_key(s) for s in TERMINAL)]
            start = 0
            while n := int(
                self._index_ended_chunk(keys=keys, args=[self.job_key(""), start, chunk])
            ):
                start += n
            self.r.set(marker, 1)
        self._ended_indexed = True

    def counts(self) -> FarmCounts:
        """Jobs per state, images outstanding, the running jobs' images/s and the farm's
        totals, in one round trip (Redis reads one field set per active job; ended jobs
        are counted from their index). The totals change only in the scripts, for bits
        that flip, so every reader sees the same numbers and a task run twice counts
        nothing twice."""
        self.index_ended()
        flat, outstanding, stats, rate = self._counts(
            keys=[
                self.key("active"),
                *(self.ended_key(s) for s in TERMINAL),
                self.stats_key,
            ],
            args=[self.job_key(""), time.time()],
        )
        jobs = dict.fromkeys(STATES, 0)
        for state, n in zip(flat[::2], flat[1::2], strict=True):
            jobs[_s(state)] = int(n)
        totals = {_s(k): int(v) for k, v in zip(stats[::2], stats[1::2], strict=True)}
        return FarmCounts(jobs, int(outstanding), totals, float(rate))

    def list(
        self, limit: int = 50, offset: int = 0, state: str | None = None, chunk: int = 256
    ) -> list[JobRecord]:
        """Jobs newest first. With ``state``, only the jobs in it: ended states straight
        from their index, unfinished ones looked for among the active jobs, ``chunk`` at a
        time (doubling, up to 4,096) until ``offset + limit`` are found."""
        if not state:
            return self._records(self.r.zrevrange(self.key("jobs"), offset, offset + limit - 1))
        if state in TERMINAL:
            self.index_ended()
            ids = self.r.zrevrange(self.ended_key(state), offset, offset + limit - 1)
            return [j for j in self._records(ids) if j.state == state]
        return self.scan(self.key("active"), state, limit, offset, chunk)

    def scan(
        self, source: str, state: str, limit: int, offset: int, chunk: int = 256
    ) -> list[JobRecord]:
        """The jobs in ``state`` among those of sorted set ``source``, newest first: read
        ``chunk`` records at a time (doubling, up to 4,096) until ``offset + limit`` are
        found."""
        found: dict[str, JobRecord] = {}  # by id: a job submitted meanwhile shifts the pages
        pos = 0
        while len(found) < offset + limit:
            ids = self.r.zrevrange(source, pos, pos + chunk - 1)
            if not ids:
                break
            pos += len(ids)
            for job in self._records(ids):
                if job.state == state:
                    found.setdefault(job.id, job)
            chunk = min(2 * chunk, 4096)
        return [*found.values()][offset : offset + limit]

    def _records(self, ids: Sequence[Any]) -> list[JobRecord]:
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.job_key(_s(job_id)))
        return [_record(h) for h in pipe.execute() if h]

    def active(self) -> list[JobRecord]:
        """Unfinished jobs, with the tasks given back and those waiting to be claimed.

        One round trip. A job's spec is read once and kept while the job is active: it
        never changes after submit and can be large (up to ``max_prompts`` prompts)."""
        ids = [_s(i) for i in self.r.zrange(self.key("active"), 0, -1)]
        known = self._specs
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            self._active_view(
                keys=[
                    self.job_key(job_id),
                    self.job_key(job_id, "requeue"),
                    self.job_key(job_id, "pending"),
                ],
                args=[0 if job_id in known else 1],
                client=pipe,
            )
        out, specs = [], {}
        for job_id, (flat, back, pending) in zip(ids, pipe.execute(), strict=True):
            if not flat:
                continue
            h = dict(zip(flat[::2], flat[1::2], strict=True))
            job = _record(h, len(back), known.get(job_id))
            job.requeue_tasks = tuple(int(t) for t in back)
            job.pending_tasks = tuple(int(t) for t in pending)
            specs[job_id] = job.spec
            out.append(job)
        self._specs = specs  # finished jobs drop out
        return out

    # task life cycle
    def release(
        self,
        job_id: str,
        n: int,
        cells: Sequence[int] | None = None,
        tasks_per_cell: int | None = None,
    ) -> list[int]:
        """Reserve up to ``n`` tasks of a runnable job from ``cells`` (default: all, in
        order; give ``tasks_per_cell`` with them): first those given back (pause) or to
        retry, then the next ones of each cell by number."""
        if cells is None or tasks_per_cell is None:
            plan = self.get(job_id).plan
            cells, tasks_per_cell = range(plan.n_cells), plan.tasks_per_cell
        out = self._release(
            keys=[
                self.job_key(job_id),
                self.job_key(job_id, "requeue"),
                self.job_key(job_id, "pending"),
            ],
            args=[n, time.time(), tasks_per_cell, *cells],
        )
        return [int(t) for t in out]

    def claim(self, job_id: str, task_no: int, worker: str, instance: str = "") -> str:
        """Called by a worker before it starts a task: 'ok', or the state that forbids it.

        A paused job takes the task back (it is released again on resume). ``instance``
        identifies the worker process (a restarted worker keeps its name, not this)."""
        res = self._claim(
            keys=[
                self.job_key(job_id),
                self.events_key,
                self.job_key(job_id, "requeue"),
                self.running_key,
                self.job_key(job_id, "pending"),
                self.stats_key,
            ],
            args=[task_no, worker, time.time(), job_id, instance or worker],
        )
        return _s(res)

    def finish_task(self, job_id: str, task_no: int) -> bool:
        """Mark a task finished; False if it was already (a duplicate run)."""
        res = self._finish(
            keys=[
                self.job_key(job_id),
                self.job_key(job_id, "tasks"),
                self.wake_key,
                self.running_key,
                self.events_key,
                self.stats_key,
            ],
            args=[task_no, job_id],
        )
        return int(res) >= 0

    def stale_releases(
        self, job_ids: Sequence[str], older_than: float, now: float
    ) -> dict[str, list[int]]:
        """Per job, the tasks released before ``older_than`` seconds ago that no worker has
        claimed: a scheduler died between releasing and sending them, or the message was
        lost. Their release time is renewed, as they are about to be sent again. Two round
        trips whatever the number of jobs."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.zrangebyscore(self.job_key(job_id, "pending"), "-inf", now - older_than)
        found = {
            job_id: [int(t) for t in got]
            for job_id, got in zip(job_ids, pipe.execute(), strict=True)
            if got
        }
        self.renew_releases(found, now)
        return found

    def renew_releases(self, tasks: dict[str, list[int]], now: float) -> None:
        """Set the release time of these tasks (per job) to ``now``, those still waiting
        to be claimed only: they are being sent again. One round trip."""
        if not tasks:
            return
        pipe = self.r.pipeline(transaction=False)
        for job_id, nos in tasks.items():
            pipe.zadd(self.job_key(job_id, "pending"), {str(t): now for t in nos}, xx=True)
        pipe.execute()

    def running(self) -> dict[str, list[tuple[str, int]]]:
        """Claimed, unfinished tasks by worker instance."""
        out: dict[str, list[tuple[str, int]]] = {}
        for key, worker in self.r.hgetall(self.running_key).items():
            job_id, _, task = _s(key).partition("/")
            out.setdefault(_s(worker), []).append((job_id, int(task)))
        return out

    def forget_running(self, job_id: str, task_no: int, instance: str) -> bool:
        """Drop the claim of a task if worker process ``instance`` holds it (not one that
        another worker made since). True if it did."""
        res = self._forget_claim(keys=[self.running_key], args=[f"{job_id}/{task_no}", instance])
        return bool(res)

    def lose_task(self, job_id: str, task_no: int, instance: str) -> tuple[int, bool]:
        """Count that worker process ``instance`` died while it held this task: the
        number of times so far, and whether this death is new. Counting one death again
        changes nothing. A retry of the job's failed images starts the count again."""
        n, new = self._lose(keys=[self.job_key(job_id, "lost")], args=[task_no, instance])
        return int(n), bool(new)

    def fail_task(self, job_id: str, task_no: int) -> bool:
        """End a task without running it again: its images not done are failed (a retry
        renders them). False if it had finished already."""
        task = self.get(job_id).plan.task(task_no)
        self.mark(job_id, list(task.images), ok=False)
        return self.finish_task(job_id, task_no)

    def record_error(
        self,
        job_id: str,
        task_no: int | None,
        images: Sequence[int],
        *,
        stage: str,
        error: str,
        worker: str,
        model: str,
        images_failed: bool,
    ) -> bool:
        """Keep why a run of a task failed, so that the job says it (the API's
        ``/v1/jobs/<id>/errors``, ``farm errors``), not only a worker's log: the
        ``stage`` it failed in (``ERROR_STAGES``), the error, the worker and model, the
        images the run was for, and whether they are now failed (or the task goes to
        another worker). ``task_no`` None: no task of the job ran, but it waits for what
        failed (a worker loading the job's model ahead of its tasks). Call it before
        marking the images failed, so that a job seen as failed already tells why. The
        last ``ERRORS_KEPT`` are kept; the job counts all. False if there is no such job."""
        if stage not in ERROR_STAGES:
            raise ValueError(f"stage must be one of {', '.join(ERROR_STAGES)}")
        entry = {
            "at": round(time.time(), 3),
            "task": None if task_no is None else int(task_no),
            "images": [int(i) for i in images],
            "stage": stage,
            "error": error[:ERROR_CHARS],
            "worker": worker,
            "model": model,
            "images_failed": bool(images_failed),
        }
        res = self._record_error(
            keys=[self.job_key(job_id), self.job_key(job_id, "errors"), self.stats_key],
            args=[json.dumps(entry), ERRORS_KEPT, stage],
        )
        return int(res) >= 0

    def errors(self, job_id: str, offset: int = 0, limit: int = 50) -> list[dict[str, Any]]:
        """The failures recorded for a job (see ``record_error``), newest first."""
        if limit <= 0:
            return []
        got = self.r.lrange(self.job_key(job_id, "errors"), offset, offset + limit - 1)
        return [json.loads(e) for e in got]

    def mark(self, job_id: str, indices: list[int], ok: bool = True) -> dict[str, Any]:
        """Record images as done (or failed). Returns the deltas and the new counters."""
        if not indices:
            return {"changed_done": 0, "changed_failed": 0}
        dd, fd, done, failed, state = self._mark(
            keys=[
                self.job_key(job_id),
                self.job_key(job_id, "done"),
                self.job_key(job_id, "failed"),
                self.key("active"),
                self.events_key,
                self.ended_key("done"),
                self.ended_key("failed"),
                self.stats_key,
            ],
            args=["1" if ok else "0", time.time(), job_id, *indices],
        )
        return {
            "changed_done": int(dd),
            "changed_failed": int(fd),
            "done": int(done),
            "failed": int(failed),
            "state": _s(state),
        }

    def is_done(self, job_id: str, index: int) -> bool:
        return bool(self.r.getbit(self.job_key(job_id, "done"), index))

    def done_flags(self, job_id: str, indices: range) -> list[bool]:
        """Done bits of a range of images in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        key = self.job_key(job_id, "done")
        for i in indices:
            pipe.getbit(key, i)
        return [bool(b) for b in pipe.execute()]

    def done_indices(self, job_id: str, offset: int = 0, limit: int = 100) -> list[int]:
        """Indices of stored images, in order, skipping the first ``offset`` of them."""
        job = self.get(job_id)
        out: list[int] = []
        seen = 0
        chunk = 1 << 16  # bits per GETRANGE
        key = self.job_key(job_id, "done")
        for base in range(0, job.total, chunk):
            data = self.r.getrange(key, base // 8, (base + chunk) // 8 - 1)
            for idx in _set_bits(data, base, job.total):
                if seen >= offset:
                    out.append(idx)
                    if len(out) >= limit:
                        return out
                seen += 1
        return out

    # controls
    def transition(self, job_id: str, to: str, allowed_from: tuple[str, ...]) -> str:
        res = self._transition(
            keys=[self.job_key(job_id), self.key("active"), self.events_key, self.ended_key(to)],
            args=[job_id, time.time(), to, ",".join(allowed_from)],
        )
        return _s(res)

    def cancel(self, job_id: str) -> str:
        """Cancel a job: 'ok', or the state it was in if that cannot be cancelled.

        Once this returns, no new task of the job starts (workers claim every task
        against the job state first); images already stored stay.
        """
        return self.transition(job_id, "cancelled", ("queued", "running", "paused"))

    def pause(self, job_id: str) -> str:
        """No task of the job starts after this returns; released tasks come back."""
        return self.transition(job_id, "paused", ("queued", "running"))

    def resume(self, job_id: str) -> str:
        res = self.transition(job_id, "resumed", ("paused",))
        self.wake()
        return res

    def set_priority(self, job_id: str, priority: int) -> None:
        if not 0 <= priority <= 100:
            raise ValueError("priority must be between 0 and 100")
        if not self.r.hset(self.job_key(job_id), "priority", priority) and not self.exists(job_id):
            raise JobNotFound(job_id)
        self.event({"type": "job-priority", "job": job_id, "priority": priority})
        self.wake()

    def retry_failed(self, job_id: str) -> tuple[str, int]:
        """Render the failed images again: (state, number of images to retry)."""
        job = self.get(job_id)
        images = _bits(self.r, self.job_key(job_id, "failed"), job.total)
        if not images:
            return job.state, 0
        plan = job.plan
        tasks = sorted({plan.task_of(i) for i in images})
        state, n = self._retry(
            keys=[
                self.job_key(job_id),
                self.job_key(job_id, "failed"),
                self.job_key(job_id, "tasks"),
                self.job_key(job_id, "requeue"),
                self.key("active"),
                self.events_key,
                self.ended_key("done"),
                self.ended_key("failed"),
                self.stats_key,
            ],
            args=[job_id, time.time(), len(images), plan.tasks_per_cell, *images, *tasks],
        )
        if int(n):  # the tasks go out again with their count of lost workers at zero
            fields = [f"{t}{s}" for t in tasks for s in ("", ":by")]
            self.r.hdel(self.job_key(job_id, "lost"), *fields)
        self.wake()
        return _s(state), int(n)

    # events
    def event(self, fields: dict[str, Any]) -> None:
        """Append an event (its ``type`` and fields) to the stream, capped in length."""
        self.r.xadd(self.events_key, fields, maxlen=EVENTS_MAXLEN, approximate=True)

    def events(self, after: str = "", count: int = 1000) -> list[tuple[str, dict[str, str]]]:
        """Events after stream id ``after`` (all from the start when empty)."""
        start = f"({after}" if after else "-"
        return [
            (_s(i), {_s(k): _s(v) for k, v in f.items()})
            for i, f in self.r.xrange(self.events_key, min=start, count=count)
        ]


def error_text(exc: BaseException) -> str:
    """``Type: message`` of an exception (``record_error`` cuts it to ``ERROR_CHARS``)."""
    return f"{type(exc).__name__}: {exc}"


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _f(v: Any) -> float | None:
    return float(v) if v not in (None, b"", "") else None


def _record(h: dict[Any, Any], requeued: int = 0, spec: JobSpec | None = None) -> JobRecord:
    h = {_s(k): _s(v) for k, v in h.items()}
    if spec is None:
        spec = JobSpec.model_construct(**json.loads(h["spec"]))  # validated at submit
    job = JobRecord(
        id=h["id"],
        spec=spec,
        state=h["state"],
        priority=int(h.get("priority", spec.priority)),
        total=int(h["total"]),
        n_tasks=int(h["n_tasks"]),
        done=int(h.get("done", 0)),
        failed=int(h.get("failed", 0)),
        cursor=int(h.get("cursor", 0)),
        inflight=int(h.get("inflight", 0)),
        requeued=int(requeued),
        tasks_started=int(h.get("tasks_started", 0)),
        tasks_finished=int(h.get("tasks_finished", 0)),
        created_at=float(h["created_at"]),
        started_at=_f(h.get("started_at")),
        finished_at=_f(h.get("finished_at")),
        last_release=_f(h.get("last_release")),
        errors=int(h.get("errors", 0)),
        extra={"batch_size": int(h.get("batch_size", 0)) or None},
    )
    job.full_cells, job.cell_cursors = _cell_cursors(h, job)
    return job


def _cell_cursors(h: dict[str, str], job: JobRecord) -> tuple[int, dict[int, int]]:
    """The cells all out below, and each other released-from cell's next task never
    released. A job from before per-cell cursors (no ``percell``) has one cursor over all
    tasks instead: the cells it passed are all out, the one it is in is partly."""
    if "percell" in h:
        return int(h.get("full", 0)), {
            int(k[2:]): int(v) for k, v in h.items() if k.startswith("c:")
        }
    pos, tpc = job.cursor, job.plan.tasks_per_cell
    passed = pos // tpc
    return passed, ({passed: pos} if pos > passed * tpc else {})


def _set_bits(data: bytes, base: int, total: int) -> Iterator[int]:
    """Indices (from ``base``) of the set bits of bitmap bytes, in order, below ``total``."""
    for byte_i, byte in enumerate(data):
        if byte:
            for bit in range(8):
                if byte & (0x80 >> bit):
                    idx = base + byte_i * 8 + bit
                    if idx >= total:
                        return
                    yield idx


def _bits(r: redis.Redis, key: str, total: int) -> list[int]:
    """Indices of the set bits of a bitmap below ``total``."""
    return list(_set_bits(r.get(key) or b"", 0, total))
