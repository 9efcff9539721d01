"""The farm's HTTP API (FastAPI): submit jobs, follow them, list their images.

Nothing here imports torch: the API validates specs against the engine's sampler names
(``workers.engine.names``, torch-free) and talks only to Redis and object storage.
"""

from __future__ import annotations

import builtins
import re
import threading
from typing import Annotated, Any, cast

import redis
from fastapi import FastAPI, HTTPException, Query, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

import storage
from farm.api import dashboard, errors, inputs, metrics, sdapi
from farm.api.errors import FieldError, SafeJSONResponse, check_encodable
from farm.api.schemas import (
    BODY_ERRORS,
    ERRORS,
    NOT_FOUND,
    ErrorBody,
    ErrorsPage,
    FarmStats,
    Health,
    ImagesPage,
    JobDetail,
    JobSummary,
    ModelInfo,
    PriorityChange,
    WorkerInfo,
)
from farm.config import Config
from farm.embeddings import names_in, prompt_texts
from farm.jobs import ERROR_STAGES, ERRORS_KEPT, STATES, JobNotFound, JobRecord, Ledger
from farm.models import (
    EMBEDDING,
    FLUX_DEFAULTS,
    LORA,
    LORA_ENGINES,
    ModelEntry,
    ModelRegistry,
    family_problems,
    no_loras,
)
from farm.redis_client import connect
from farm.spec import JobSpec, Plan, set_limits
from farm.workers_registry import WorkerRegistry
from storage.keys import image_key

TITLE = "render farm"
TOTALS = (  # the farm's totals /v1/stats always has (Ledger.counts' names)
    "images_done",
    "images_failed",
    "images_retried",
    "jobs_submitted",
    "task_runs",
    "tasks_finished",
    *(f"errors:{stage}" for stage in ERROR_STAGES),
)
MAX_BODY_BYTES = 64 * 1024 * 1024
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class BodyLimit:
    """Refuse (413) a request whose declared Content-Length is over ``limit`` bytes."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", ()):
                if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                    msg = f"request body of {int(value)} bytes; at most {self.limit}"
                    await SafeJSONResponse({"detail": msg}, status_code=413)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class Farm:
    """What the endpoints share: config, Redis-backed registries and the object store."""

    def __init__(self, config: Config, client: redis.Redis, store: storage.ObjectStore | None):
        self.config = config
        self.redis = client
        self.ledger = Ledger(client, config.namespace)
        self.models = ModelRegistry(client, config.namespace)
        self.workers = WorkerRegistry(client, config.namespace)
        self._store = store
        self._lock = threading.Lock()

    def store(self) -> storage.ObjectStore:
        with self._lock:
            if self._store is None:
                try:
                    self._store = storage.open_store(self.config.storage_url)
                except (ValueError, storage.StorageError) as exc:
                    raise HTTPException(503, f"object storage is unavailable: {exc}") from None
            return self._store

    def job(self, job_id: str) -> JobRecord:
        if not _JOB_ID.fullmatch(job_id):
            raise HTTPException(404, f"no job {job_id!r}")
        try:
            return self.ledger.get(job_id)
        except JobNotFound:
            raise HTTPException(404, f"no job {job_id!r}") from None

    def detail(self, job: JobRecord) -> dict[str, Any]:
        last = self.ledger.errors(job.id, limit=1) if job.errors else []
        return {
            **job.summary(),
            "spec": job.spec.model_dump(mode="json"),
            "batch_size": job.extra.get("batch_size"),
            "last_error": last[0] if last else None,
        }

    def check_output_prefix(self, spec: JobSpec) -> None:
        """The prefix must make valid storage keys (JobSpec's own check lets '.' or a
        trailing newline through, which storage would refuse only when images are written)."""
        prefix = spec.output_prefix
        if not prefix:
            return
        try:
            image_key(prefix, "job", 0, 0)
        except ValueError as exc:
            raise FieldError("output_prefix", str(exc).replace("storage key", "prefix")) from None
        if any(c.isspace() for c in prefix):
            raise FieldError("output_prefix", "must not contain whitespace")

    def check_models(self, spec: JobSpec) -> None:
        """Every model of the job is a registered checkpoint, every LoRA a registered LoRA
        (``check_loras``)."""
        names = [("model", spec.model)]
        names += [(f"sweep.model[{i}]", m) for i, m in enumerate(spec.sweep.get("model", []))]
        for field, name in names:
            entry = self.models.get(name)
            if entry is None:
                shown = _names(self.models.checkpoints())
                raise FieldError(field, f"unknown model {name!r}; registered: {shown}")
            if entry.engine == LORA:
                raise FieldError(
                    field,
                    f"{name!r} is a LoRA, not a checkpoint: name a checkpoint here and list "
                    f'the LoRA in loras ([{{"name": "{name}", "weight": 1}}])',
                )
            if entry.engine == EMBEDDING:
                raise FieldError(
                    field,
                    f"{name!r} is a textual-inversion embedding, not a checkpoint: name a "
                    "checkpoint here and write the embedding's name in the prompt",
                )
            if spec.loras and entry.engine not in LORA_ENGINES:
                raise FieldError("loras", no_loras(entry))
        self.check_loras(spec)
        self.check_families(spec)

    def with_family_defaults(self, spec: JobSpec) -> JobSpec:
        """The spec with the settings it leaves out set to its models' family defaults
        where those differ from the spec's own (a Flux job samples with Euler at guidance
        3.5, not Euler a at 7), when all its models are of that family."""
        names = dict.fromkeys([spec.model, *spec.sweep.get("model", [])])
        engines = {e.engine if (e := self.models.get(n)) else None for n in names}
        if engines != {"flux"}:
            return spec
        unset = {k: v for k, v in FLUX_DEFAULTS.items() if k not in spec.model_fields_set}
        return spec.model_copy(update=unset) if unset else spec

    def check_families(self, spec: JobSpec) -> None:
        """Each setting of the job fits the family of each of its models (a Flux model
        samples with Euler only, say); FieldError naming the setting, or its sweep value."""
        names = dict.fromkeys([spec.model, *spec.sweep.get("model", [])])
        engines = {e.engine for n in names if (e := self.models.get(n)) is not None}
        for engine in sorted(engines):
            for key in ("sampler_name", "scheduler", "width", "height", "clip_skip"):
                values = [(key, getattr(spec, key))]
                values += [(f"sweep.{key}[{i}]", v) for i, v in enumerate(spec.sweep.get(key, []))]
                for field, value in values:
                    for _, why in family_problems(engine, {key: value}):
                        raise FieldError(field, why)

    def check_loras(self, spec: JobSpec) -> None:
        """Each of the job's LoRAs is registered as a LoRA, made for the family of each of
        the job's models when its file told which; FieldError naming ``loras[i].name``
        otherwise."""
        if not spec.loras:
            return
        names = [spec.model, *spec.sweep.get("model", [])]
        models = {n: e for n in dict.fromkeys(names) if (e := self.models.get(n)) is not None}
        for i, lora in enumerate(spec.loras):
            entry = self.models.get(lora.name)
            if entry is None:
                known = self.models.loras()
                shown = (
                    f"registered LoRAs: {_names(known)}"
                    if known
                    else "none is registered (farm models add FILE --name NAME)"
                )
                raise FieldError(f"loras[{i}].name", f"unknown LoRA {lora.name!r}; {shown}")
            if entry.engine != LORA:
                raise FieldError(
                    f"loras[{i}].name",
                    f"{lora.name!r} is {entry.kind}, not a LoRA",
                )
            for model in models.values():
                if entry.family and model.engine in LORA_ENGINES and entry.family != model.engine:
                    raise FieldError(
                        f"loras[{i}].name",
                        f"{lora.name!r} is a LoRA for {entry.family} models; model "
                        f"{model.name!r} is {model.engine}",
                    )

    def with_embeddings(self, spec: JobSpec) -> JobSpec:
        """The spec with its ``embeddings`` listed: as the client gave them (each must be a
        registered embedding made for the family of each of the job's models; FieldError
        naming ``embeddings[i]`` otherwise), or, left out, the registered embeddings whose
        names its prompts hold (``farm.embeddings.names_in``) and that fit one of its
        models (A1111 reads a name that fits no model as text, so does the farm)."""
        names = [spec.model, *spec.sweep.get("model", [])]
        families = {e.engine for n in dict.fromkeys(names) if (e := self.models.get(n)) is not None}
        if spec.embeddings is None:
            fitting = [e.name for e in self.models.embeddings() if e.family in families]
            return spec.model_copy(update={"embeddings": names_in(prompt_texts(spec), fitting)})
        for i, name in enumerate(spec.embeddings):
            field = f"embeddings[{i}]"
            entry = self.models.get(name)
            if entry is None or entry.engine != EMBEDDING:
                known = self.models.embeddings()
                shown = (
                    f"registered embeddings: {_names(known)}"
                    if known
                    else "none is registered (farm models add FILE --name NAME)"
                )
                what = (
                    f"unknown embedding {name!r}"
                    if entry is None
                    else f"{name!r} is {entry.kind}, not an embedding"
                )
                raise FieldError(field, f"{what}; {shown}")
            for family in sorted(families - {entry.family}):
                raise FieldError(
                    field,
                    f"{name!r} is an embedding for {entry.family} models; the job's models "
                    f"include {family}",
                )
        return spec


def create_app(
    config: Config | None = None,
    redis_client: redis.Redis | None = None,
    store: storage.ObjectStore | None = None,
) -> FastAPI:
    """The API app. Redis and the store come from ``config`` unless given."""
    config = config or Config.from_env()
    set_limits(config)
    if redis_client is None:
        redis_client = connect(config)
    farm = Farm(config, redis_client, store)
    app = FastAPI(
        title=TITLE,
        version="1",
        description="Submit diffusion render jobs, follow their progress, fetch the images.",
        default_response_class=SafeJSONResponse,
    )
    app.state.farm = farm
    errors.install(app)
    app.add_middleware(BodyLimit)

    @app.post(
        "/v1/jobs",
        status_code=201,
        response_model=JobDetail,
        responses=BODY_ERRORS,
        summary="Submit a job",
    )
    def submit(spec: JobSpec) -> Response:
        check_encodable(spec.model_dump())
        farm.check_output_prefix(spec)
        spec = farm.with_family_defaults(spec)
        farm.check_models(spec)
        inputs.check_init_image(farm, spec)  # img2img: the picture is stored
        inputs.check_hires(farm, spec)  # hires fix: SD1 and SDXL models only
        spec = farm.with_embeddings(spec)
        job = farm.ledger.create(spec, config.default_batch_size)
        return SafeJSONResponse(farm.detail(job), status_code=201)

    @app.get("/v1/jobs", response_model=list[JobSummary], responses=ERRORS, summary="List jobs")
    def list_jobs(
        state: Annotated[str | None, Query(description=f"one of {', '.join(STATES)}")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    ) -> Response:
        if state == "":
            state = None
        if state is not None and state not in STATES:
            raise FieldError("state", f"must be one of {', '.join(STATES)}")
        jobs = farm.ledger.list(limit=limit, offset=offset, state=state)
        return SafeJSONResponse([j.summary() for j in jobs])

    @app.get(
        "/v1/jobs/{job_id}",
        response_model=JobDetail,
        responses={**ERRORS, **NOT_FOUND},
        summary="A job's progress and spec",
    )
    def get_job(job_id: str) -> Response:
        return SafeJSONResponse(farm.detail(farm.job(job_id)))

    @app.get(
        "/v1/jobs/{job_id}/images",
        response_model=ImagesPage,
        responses={**ERRORS, **NOT_FOUND},
        summary="The stored images of a job, in index order",
    )
    def images(
        job_id: str,
        offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Response:
        job = farm.job(job_id)
        # (cast: inside Ledger, ``list[int]`` resolves to its method ``list`` for mypy)
        indices = cast("builtins.list[int]", farm.ledger.done_indices(job.id, offset, limit))
        plan = Plan(job.spec, job.extra.get("batch_size"))
        prefix = job.spec.output_prefix or config.output_prefix
        store = farm.store() if indices else None
        out = []
        for index in indices:
            image = plan.image(index)
            key = image_key(prefix, job.id, index, image.seed)
            assert store is not None
            try:
                url = store.url(key)
            except storage.StorageError as exc:
                raise HTTPException(503, f"object storage is unavailable: {exc}") from None
            subseed = image.subseed if image.subseed_strength else None
            out.append(
                {"index": index, "seed": image.seed, "subseed": subseed, "prompt": image.prompt,
                 "key": key, "url": url}
            )  # fmt: skip
        next_offset = offset + len(out) if len(out) == limit else None
        return SafeJSONResponse({"job": job.id, "images": out, "next_offset": next_offset})

    @app.get(
        "/v1/jobs/{job_id}/errors",
        response_model=ErrorsPage,
        responses={**ERRORS, **NOT_FOUND},
        summary="Why runs of the job's tasks failed, newest first",
    )
    def job_errors(
        job_id: str,
        offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[int, Query(ge=1, le=ERRORS_KEPT)] = 50,
    ) -> Response:
        job = farm.job(job_id)
        got = farm.ledger.errors(job.id, offset, limit)
        kept = min(job.errors, ERRORS_KEPT)
        next_offset = offset + len(got) if got and offset + len(got) < kept else None
        page = {"job": job.id, "errors": got, "total": job.errors, "next_offset": next_offset}
        return SafeJSONResponse(page)

    @app.post(
        "/v1/jobs/{job_id}/cancel",
        response_model=JobDetail,
        responses={
            **ERRORS,
            **NOT_FOUND,
            409: {"model": ErrorBody, "description": "already finished"},
        },
        summary="Cancel a job (images already stored stay)",
    )
    def cancel(job_id: str) -> Response:
        job = farm.job(job_id)
        res = farm.ledger.cancel(job.id)
        if res == "missing":
            raise HTTPException(404, f"no job {job_id!r}")
        if res not in ("ok", "cancelled"):
            raise HTTPException(409, f"job {job.id} is {res}; it can no longer be cancelled")
        return SafeJSONResponse(farm.detail(farm.job(job.id)))

    conflict = {409: {"model": ErrorBody, "description": "not possible in the job's state"}}

    @app.post(
        "/v1/jobs/{job_id}/pause",
        response_model=JobDetail,
        responses={**ERRORS, **NOT_FOUND, **conflict},
        summary="Pause a job: no task of it starts after this returns",
    )
    def pause(job_id: str) -> Response:
        job = farm.job(job_id)
        res = farm.ledger.pause(job.id)
        if res not in ("ok", "paused"):
            raise HTTPException(409, f"job {job.id} is {res}; only a queued or running job pauses")
        return SafeJSONResponse(farm.detail(farm.job(job.id)))

    @app.post(
        "/v1/jobs/{job_id}/resume",
        response_model=JobDetail,
        responses={**ERRORS, **NOT_FOUND, **conflict},
        summary="Resume a paused job",
    )
    def resume(job_id: str) -> Response:
        job = farm.job(job_id)
        res = farm.ledger.resume(job.id)
        if res not in ("ok", "queued", "running"):
            raise HTTPException(409, f"job {job.id} is {res}; it can no longer resume")
        return SafeJSONResponse(farm.detail(farm.job(job.id)))

    @app.post(
        "/v1/jobs/{job_id}/retry",
        response_model=JobDetail,
        responses={**ERRORS, **NOT_FOUND, **conflict},
        summary="Render the job's failed images again",
    )
    def retry(job_id: str) -> Response:
        job = farm.job(job_id)
        state, _n = farm.ledger.retry_failed(job.id)
        if state == "cancelled":
            raise HTTPException(409, f"job {job.id} is cancelled; it cannot be retried")
        return SafeJSONResponse(farm.detail(farm.job(job.id)))

    @app.post(
        "/v1/jobs/{job_id}/priority",
        response_model=JobDetail,
        responses={**ERRORS, **BODY_ERRORS, **NOT_FOUND},
        summary="Change a job's priority, also while it runs",
    )
    def priority(job_id: str, change: PriorityChange) -> Response:
        job = farm.job(job_id)
        farm.ledger.set_priority(job.id, change.priority)
        return SafeJSONResponse(farm.detail(farm.job(job.id)))

    @app.get(
        "/v1/stats",
        response_model=FarmStats,
        responses=ERRORS,
        summary="Jobs per state, images outstanding, images/s, the farm's totals, workers",
    )
    def stats() -> Response:
        """What the dashboard's cards and ``farm watch`` show, exact: the ledger's counts
        (one script call, which reads five fields per unfinished job and counts the ended
        ones from their index) and the live workers. The Redis commands it sends do not
        grow with the number of jobs."""
        counts = farm.ledger.counts()
        return SafeJSONResponse(
            {
                "jobs": {s: counts.jobs.get(s, 0) for s in STATES},
                "images_outstanding": counts.images_outstanding,
                "images_per_s": round(counts.images_per_s, 4),
                "totals": {**dict.fromkeys(TOTALS, 0), **counts.totals},
                "workers": len(farm.workers.live()),
            }
        )

    @app.get("/v1/workers", response_model=list[WorkerInfo], responses=ERRORS)
    def workers() -> Response:
        return SafeJSONResponse(farm.workers.live())

    @app.get("/v1/models", response_model=list[ModelInfo], responses=ERRORS)
    def models() -> Response:
        return SafeJSONResponse([m.to_dict() for m in farm.models.list()])

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    def healthz(request: Request) -> JSONResponse:
        try:
            farm.redis.ping()
        except redis.RedisError as exc:
            reason = f"redis at {_redacted(config.redis())}: {type(exc).__name__}: {exc}"
            return SafeJSONResponse({"ok": False, "detail": reason}, status_code=503)
        return SafeJSONResponse({"ok": True})

    metrics.install(app, farm)  # /metrics: Prometheus text read from Redis per scrape
    app.include_router(dashboard.router)  # /dashboard: the job dashboard page
    app.include_router(sdapi.router(farm))  # /sdapi/v1/...: the A1111-compatible API
    app.include_router(inputs.router(farm))  # /v1/inputs: input pictures for img2img
    return app


def _names(entries: list[ModelEntry], most: int = 20) -> str:
    names = [e.name for e in entries]
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def _redacted(url: str) -> str:
    """A Redis URL without its password."""
    return re.sub(r"//[^@/]*@", "//***@", url)
