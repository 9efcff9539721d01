"""Farm configuration: every setting comes from a ``FARM_*`` environment variable.

``farm config`` prints the effective values. The standard ``AWS_*`` variables configure
boto3 directly and are not repeated here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

PREFIX = "FARM_"
EMBEDDED_REDIS_FILE = "redis.url"  # written by `farm up` while its embedded server runs


def _data_dir() -> Path:
    return Path(os.environ.get("FARM_DATA_DIR", "./farm-data")).absolute()


@dataclass(frozen=True)
class Config:
    """Effective settings. Field ``foo`` is read from ``FARM_FOO``."""

    data_dir: str = field(default_factory=lambda: str(_data_dir()))
    # Empty means: `farm up` starts an embedded Redis-compatible server; other commands
    # fall back to redis://127.0.0.1:6379/0.
    redis_url: str = ""
    namespace: str = "farm"
    storage_url: str = field(default_factory=lambda: "file://" + str(_data_dir() / "storage"))
    model_cache: str = field(default_factory=lambda: str(_data_dir() / "models"))
    # Flux workers: a directory holding T5 v1.1's tokenizer (tokenizer.json, as in
    # FLUX.1-dev's tokenizer_2/), which the farm does not ship; the engine reads it here
    flux_t5_tokenizer: str = ""
    output_prefix: str = "renders"
    default_model: str = "demo-shapes"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    flower_port: int = 5555
    # the A1111-compatible POST /sdapi/v1/txt2img waits this long for its job to end, then
    # answers 504 and cancels the job (nobody is waiting for it any more)
    sdapi_timeout: float = 600.0
    sdapi_max_images: int = 1000  # batch_size x n_iter of one such request, at most
    # a Redis call waits this long for an answer, then the connection counts as broken
    redis_timeout: float = 10.0
    # Celery / broker
    visibility_timeout: int = 3600  # seconds; above the longest task
    # a worker whose store is unreachable keeps trying to store each image this long
    storage_wait: float = 300.0
    # a model load, render or store that makes no progress this long means the worker
    # process hangs: it ends, its task goes to another worker and the launcher starts the
    # process again. Above the longest single sampler step or VAE decode; 0 turns it off
    stall_timeout: float = 300.0
    # scheduler
    queue_depth: int = 4  # tasks released but not finished, per worker (min 2 in total)
    scheduler_interval: float = 0.5  # longest wait between scheduler ticks
    worker_ttl: int = 30  # seconds a worker inventory entry lives without a heartbeat
    leader_ttl: float = 5.0  # seconds the scheduler leader's lease lasts without renewal
    resend_after: float = 600.0  # a released task no worker claimed this long goes again
    aging_s: float = 60.0  # a job waiting this long without a release gains one priority
    default_load_s: float = 30.0  # model load estimate until a worker has measured one
    default_image_s: float = 2.0  # seconds per image estimate until measured
    min_dwell_s: float = 10.0  # a worker keeps an assigned model at least this long
    fail_limit: int = 3  # failures of one model on one worker within fail_window ...
    fail_window: float = 300.0
    fail_block: float = 600.0  # ... keep that worker off that model this long
    # a task whose worker died under it this many times (killed, crashed, hung) fails its
    # images rather than going to yet another worker
    task_losses: int = 3
    # limits of a job spec
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch_size: int = 64
    default_batch_size: int = 4
    max_images: int = 10_000_000
    max_prompts: int = 100_000
    max_prompt_chars: int = 10_000
    max_sweep_values: int = 1_000
    max_cfg_scale: float = 30.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Config:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = {"int": int, "float": float}.get(str(f.type), str)
            try:
                values[f.name] = kind(raw)
            except ValueError as exc:
                raise ValueError(
                    f"{PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}"
                ) from exc
        return cls(**values)  # type: ignore[arg-type]

    def redis(self) -> str:
        """FARM_REDIS_URL, else the embedded server of a running `farm up` on this data
        directory, else a local Redis on the default port."""
        if self.redis_url:
            return self.redis_url
        try:
            return Path(self.data_dir, EMBEDDED_REDIS_FILE).read_text().strip()
        except OSError:
            return "redis://127.0.0.1:6379/0"

    def items(self) -> list[tuple[str, object]]:
        return [(PREFIX + f.name.upper(), getattr(self, f.name)) for f in fields(self)]


def load() -> Config:
    return Config.from_env()
