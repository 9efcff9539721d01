"""Response bodies of the HTTP API, as pydantic models for the OpenAPI document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from farm.jobs import ERROR_STAGES, ERRORS_KEPT
from farm.spec import JobSpec


class FieldProblem(BaseModel):
    field: str = Field(description="dotted location, e.g. 'width' or 'sweep.model[1]'")
    msg: str


class ErrorBody(BaseModel):
    detail: list[FieldProblem] | str


class JobSummary(BaseModel):
    id: str
    state: str
    model: str
    priority: int
    total: int = Field(description="images in the job")
    done: int
    failed: int
    tasks: int
    tasks_finished: int
    errors: int = Field(description="failed runs of its tasks so far (see /errors)")
    images_per_s: float
    eta_s: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    seed: int = Field(description="the job seed (chosen at submit if the spec said -1)")
    tags: list[str]


class ErrorEntry(BaseModel):
    at: float = Field(description="when it was recorded (Unix time)")
    task: int | None = Field(
        description="the task whose run failed; null for a worker loading the job's model "
        "ahead of its tasks"
    )
    images: list[int] = Field(description="the images the run of the task was for")
    stage: str = Field(description="load, render, store, hang (no progress) or lost (the "
                       "worker process died or hung holding the task)")  # fmt: skip
    error: str = Field(description="what went wrong: 'Type: message' for an exception")
    worker: str
    model: str
    images_failed: bool = Field(
        description="the images not done are failed (a retry renders them); false when "
        "the task went to another worker"
    )


class JobDetail(JobSummary):
    spec: JobSpec
    batch_size: int | None = Field(description="images per task")
    last_error: ErrorEntry | None = Field(description="the newest failure, if any")


class ErrorsPage(BaseModel):
    job: str
    errors: list[ErrorEntry] = Field(description="newest first")
    total: int = Field(description=f"failures recorded; the last {ERRORS_KEPT} are kept")
    next_offset: int | None = Field(description="offset of the next page; null at the end")


class ImageInfo(BaseModel):
    index: int
    seed: int
    subseed: int | None = Field(
        None, description="its variation seed, when its job has a subseed_strength"
    )
    prompt: str
    key: str = Field(description="object key in the farm's storage")
    url: str = Field(description="where to GET the PNG (presigned on S3)")


class ImagesPage(BaseModel):
    job: str
    images: list[ImageInfo]
    next_offset: int | None = Field(description="offset of the next page; null at the end")


class ModelInfo(BaseModel):
    name: str
    engine: str
    sha256: str
    size: int
    key: str
    added_at: float


class WorkerInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    last_seen: float


class PriorityChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    priority: int = Field(description="0 (lowest) to 100 (highest)", ge=0, le=100)


class Health(BaseModel):
    ok: bool
    detail: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "a value is not valid; detail names the field"},
    503: {"model": ErrorBody, "description": "Redis is unavailable"},
}
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    400: {"model": ErrorBody, "description": "the body is not JSON"},
    413: {"model": ErrorBody, "description": "the body is too large"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "no such job"}
}


class JobsPerState(BaseModel):
    """Every state of ``farm.jobs.STATES``, 0 where no job is in it."""

    queued: int
    running: int
    paused: int
    done: int
    failed: int
    cancelled: int


class FarmStats(BaseModel):
    """``GET /v1/stats``: the farm's counts, exact (``Ledger.counts``)."""

    jobs: JobsPerState = Field(description="jobs in each state")
    images_outstanding: int = Field(
        description="images of queued and running jobs neither done nor failed"
    )
    images_per_s: float = Field(
        description="of the running jobs: each job's images done since its first task "
        "started, summed (a job's own images_per_s)"
    )
    totals: dict[str, int] = Field(
        description="the farm's totals since its start, each only ever growing: "
        "images_done, images_failed (an image failing again after a retry counts again), "
        "images_done:<model>, images_failed:<model>, images_retried, jobs_submitted, "
        f"task_runs, tasks_finished, errors:<stage> ({', '.join(ERROR_STAGES)}); "
        "each is present (0 before anything counted it), a per-model one once counted"
    )
    workers: int = Field(description="live workers (those /v1/workers lists)")
