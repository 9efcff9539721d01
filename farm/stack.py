"""The embedded stack of ``farm up``: every part of the farm on one machine.

A Redis-compatible server (unless ``FARM_REDIS_URL`` is set), the API, the scheduler,
Flower and one worker per local device, each its own process. Storage comes from
``FARM_STORAGE_URL`` (default a local folder). ``stop()`` ends all it started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import redis

from farm.children import die_with_parent
from farm.config import EMBEDDED_REDIS_FILE, Config
from farm.models import ModelEntry, ModelRegistry
from farm.redis_client import connect
from farm.redis_server import RedisProcess, stop_processes
from storage import open_store
from storage.models import ModelStore, sha256_file


def ensure_default_model(config: Config, client: redis.Redis) -> ModelEntry:
    """Register the default model if it is missing, with no step by the user.

    ``demo-shapes`` is the miniature text-to-image model the project trains and ships
    (``workers/demo``); ``tiny-sd1`` is a tiny random-weight SD1.x checkpoint written on
    first use (its pictures are noise; it exercises the real loader and sampler).
    """
    registry = ModelRegistry(client, config.namespace)
    existing = registry.get(config.default_model)
    if existing is not None:
        return existing
    from workers.demo import DEMO_MODEL_NAME, demo_checkpoint_path

    if config.default_model == DEMO_MODEL_NAME:
        path = demo_checkpoint_path()
        if not path.exists():
            raise FileNotFoundError(f"the demo model's checkpoint is missing: {path}")
        return register_model(config, client, path, DEMO_MODEL_NAME)
    path = Path(config.data_dir) / "checkpoints" / f"{config.default_model}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "workers.engine.tiny", str(path)],
            check=True,
            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
        )
    return register_model(config, client, path, config.default_model)


def register_model(config: Config, client: redis.Redis, path: Path, name: str) -> ModelEntry:
    """Put a checkpoint or a LoRA into storage under its sha256 and register ``name`` for
    it (a LoRA is told by its tensor names and registered with the engine ``lora``). A
    textual-inversion embedding (A1111 .pt, diffusers .bin, or .safetensors) is stored as
    the safetensors file workers read (``farm.embedding_files``)."""
    from farm.embedding_files import is_embedding
    from farm.models import (
        LORA,
        flux_missing_parts,
        lora_family,
        probe_engine,
        unet_input_problem,
    )
    from farm.spec import check_model_name

    try:
        check_model_name(name)
    except ValueError as exc:
        raise ValueError(f"--name {name!r}: {exc}") from None
    if is_embedding(path):
        return register_embedding(config, client, path, name)
    engine = probe_engine(path)
    if engine not in ("sd1", "sdxl", "flux", LORA):
        raise ValueError(
            f"{path}: model family {engine!r} is not supported yet (sd1, sdxl, flux and LoRAs)"
        )
    if engine == "flux" and (missing := flux_missing_parts(path)):
        raise ValueError(
            f"{path}: not an all-in-one Flux checkpoint, it lacks {', '.join(missing)}; the "
            "farm reads Flux as one file holding the transformer, both text encoders and the "
            "VAE (the checkpoint layout Forge and ComfyUI load), not BFL's transformer alone"
        )
    if engine in ("sd1", "sdxl") and (problem := unet_input_problem(path)):
        raise ValueError(f"{path}: {problem}")
    store = ModelStore(open_store(config.storage_url), config.model_cache)
    blob = store.add(path)
    return ModelRegistry(client, config.namespace).add(
        ModelEntry(
            name=name,
            engine=engine,
            sha256=blob.sha256,
            size=blob.size,
            key=blob.key,
            family=(lora_family(path) or "") if engine == LORA else "",
        )
    )


def register_embedding(config: Config, client: redis.Redis, path: Path, name: str) -> ModelEntry:
    """Convert an embedding file to the layout workers read, store that by its sha256 and
    register ``name`` for it, with its family, vectors and the sha256 of ``path`` itself
    (A1111's hash of the embedding). EmbeddingFileError if the file is not one."""
    from farm.embedding_files import read_embedding, to_safetensors
    from farm.models import EMBEDDING, EMBEDDING_MAX_VECTORS

    embedding = read_embedding(path)
    if embedding.vectors > EMBEDDING_MAX_VECTORS:
        raise ValueError(
            f"{path}: an embedding of {embedding.vectors} vectors; a prompt's chunk holds "
            f"{EMBEDDING_MAX_VECTORS} tokens, and an embedding must fit in one"
        )
    source = sha256_file(path)
    store = ModelStore(open_store(config.storage_url), config.model_cache)
    with tempfile.TemporaryDirectory() as tmp:
        converted = Path(tmp) / f"{name}.safetensors"
        converted.write_bytes(to_safetensors(embedding, {"farm_source_sha256": source}))
        blob = store.add(converted)
    return ModelRegistry(client, config.namespace).add(
        ModelEntry(
            name=name,
            engine=EMBEDDING,
            sha256=blob.sha256,
            size=blob.size,
            key=blob.key,
            family=embedding.family,
            vectors=embedding.vectors,
            source_sha256=source,
        )
    )


def _wait_http(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status < 500:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


class Stack:
    def __init__(
        self,
        config: Config,
        devices: str = "auto",
        flower: bool = True,
        log_dir: Path | None = None,
    ):
        self.devices = devices
        self.flower = flower
        self.redis_proc: RedisProcess | None = None
        self.config = config
        self.log_dir = log_dir or Path(config.data_dir) / "logs"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def api_url(self) -> str:
        return f"http://{self.config.api_host}:{self.config.api_port}"

    @property
    def flower_url(self) -> str:
        return f"http://{self.config.api_host}:{self.config.flower_port}"

    def start(self) -> Stack:
        if not self.config.redis_url:
            self.redis_proc = RedisProcess(Path(self.config.data_dir) / "redis").start()
            self.config = replace(self.config, redis_url=self.redis_proc.url)
            self._url_file.write_text(self.redis_proc.url + "\n")
        client = connect(self.config)
        client.ping()
        ensure_default_model(self.config, client)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # the children see exactly this stack's settings (ports chosen here included)
        env = {**os.environ, **{k: str(v) for k, v in self.config.items()}}
        py = sys.executable
        self._spawn("api", [py, "-m", "farm.cli", "api"], env)
        self._spawn("scheduler", [py, "-m", "farm.cli", "scheduler"], env)
        self._spawn("workers", [py, "-m", "farm.cli", "worker", "--devices", self.devices], env)
        if self.flower:
            self._spawn(
                "flower",
                [
                    py, "-m", "celery", "-A", "farm.flower_app", "flower",
                    f"--address={self.config.api_host}", f"--port={self.config.flower_port}",
                    "--task_runtime_metric_buckets=0.5,1,2,5,10,30,60,120,300,600,inf",
                ],
                {**env, "FLOWER_UNAUTHENTICATED_API": "true"},
            )  # fmt: skip
        if not _wait_http(self.api_url + "/healthz", 60):
            self.stop()
            raise RuntimeError(f"the API did not come up; see {self.log_dir / 'api.log'}")
        return self

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        log.close()

    def wait_for_workers(self, n: int = 1, timeout: float = 120.0) -> bool:
        from farm.workers_registry import WorkerRegistry

        reg = WorkerRegistry(connect(self.config), self.config.namespace)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(reg.live()) >= n:
                return True
            dead = [k for k, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited; see {self.log_dir}")
            time.sleep(0.3)
        return False

    def stop(self, timeout: float = 30.0) -> None:
        stop_processes(list(self.procs.values()), timeout)
        self.procs.clear()
        if self.redis_proc is not None:
            self._url_file.unlink(missing_ok=True)
            self.redis_proc.stop()
            self.redis_proc = None

    @property
    def _url_file(self) -> Path:
        return Path(self.config.data_dir) / EMBEDDED_REDIS_FILE

    def describe(self) -> dict[str, str]:
        info = {
            "api": self.api_url,
            "dashboard (Flower)": self.flower_url if self.flower else "off",
            "redis": self.config.redis(),
            "storage": open_store(self.config.storage_url).describe(),
            "logs": str(self.log_dir),
        }
        return info


def redis_reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False
