"""The render task: one contiguous image range of one job, from claim to stored PNGs.

Running the same task twice is harmless: images already marked done are skipped, the
PNG keys are deterministic, and the ledger counts an image only when its bit flips.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from PIL import Image

from farm.celery_app import RenderMessage
from farm.jobs import error_text
from farm.spec import ImageParams
from storage.base import ObjectNotFound, StorageError
from storage.keys import image_key, input_key
from storage.png import encode_png, format_parameters
from workers.engine import inpaint
from workers.engine.base import (
    AddonError,
    BatchRequest,
    EmbeddingError,
    EmbeddingRequest,
    EngineError,
    HiresRequest,
    ImageRequest,
    LoraError,
    LoraRequest,
)
from workers.engine.names import ANCESTRAL, MASKED_CONTENT
from workers.runtime import REDIS_AWAY, Runtime

log = logging.getLogger("farm.worker")


class StoreAway(Exception):
    """The store stayed unreachable until the worker began to shut down. The task is left
    claimed and unfinished, its images neither done nor failed: the worker's heartbeat
    ends with it, and the scheduler hands the task to another worker, as a dead one's."""


def put_waiting(
    put: Callable[[], None], limit_s: float, stopping: threading.Event, what: str = ""
) -> None:
    """Run ``put`` (one call to the store). While it fails with a transient StorageError
    (the store unreachable or busy), try again, 0.5 s later at first and at most 10 s
    apart, for ``limit_s`` seconds from the first failure; then the error stands. Any other
    error stands at once. StoreAway if ``stopping`` is set while waiting."""
    deadline = 0.0
    pause = 0.5
    while True:
        try:
            put()
        except StorageError as exc:
            if not exc.transient:
                raise
            now = time.monotonic()
            if not deadline:
                deadline = now + limit_s
                log.warning("storage unavailable, trying %s for %.0f s: %s", what, limit_s, exc)
            if now + pause > deadline:
                raise
            if stopping.wait(pause):
                raise StoreAway(f"worker stopping while storage is unavailable: {exc}") from exc
            pause = min(10.0, pause * 2)
        else:
            if deadline:
                log.warning("storage took %s again", what)
            return


class InputPictures:
    """Input pictures (img2img) by sha256, decoded, the ``most`` used last kept in memory:
    a picture is fetched from the store once, not once per task. Content-addressed, so
    one cache serves every store and job; what is fetched is checked against its hash."""

    def __init__(self, most: int = 4) -> None:
        self.most = most
        self._pictures: OrderedDict[str, Image.Image] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, sha: str, fetch: Callable[[str], bytes], field: str = "init_image"
    ) -> Image.Image:
        """The picture ``sha`` (RGB), ``fetch(key)`` reading its PNG when it is not kept;
        EngineError naming the input (as the job's ``field``) if it is missing or not
        what its hash says."""
        with self._lock:
            picture = self._pictures.get(sha)
            if picture is not None:
                self._pictures.move_to_end(sha)
                return picture
        key = input_key(sha)
        try:
            data = fetch(key)
        except ObjectNotFound:
            raise EngineError(
                f"{field} {sha}: no input picture {key} in the store (upload it again "
                "with POST /v1/inputs)"
            ) from None
        if hashlib.sha256(data).hexdigest() != sha:
            raise EngineError(f"{field} {sha}: the stored {key} does not have that sha256")
        try:
            with Image.open(io.BytesIO(data)) as im:
                picture = im.convert("RGB")
        except Exception as exc:
            raise EngineError(f"{field} {sha}: {key} does not decode: {exc}") from None
        with self._lock:
            self._pictures[sha] = picture
            while len(self._pictures) > self.most:
                self._pictures.popitem(last=False)
        return picture


INPUTS = InputPictures()
# inpainting's prepared picture and mask (``inpaint.prepare``) by (init picture, the job's
# inpaint settings, size): the same for every task of a job, and up to seconds of CPU for a
# large picture with a wide blur or "fill"; the ``PREPARED_MOST`` used last are kept
PREPARED: OrderedDict[tuple[Any, ...], inpaint.Prepared] = OrderedDict()
PREPARED_MOST = 4
_prepared_lock = threading.Lock()


def fit_picture(picture: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's "Just resize" (resize_mode 0): the picture stretched to exactly width x
    height with Lanczos, whatever its aspect ratio."""
    if picture.size == (width, height):
        return picture
    return picture.resize((width, height), Image.Resampling.LANCZOS)


def run_render(rt: Runtime, msg: RenderMessage, again: bool = False) -> dict[str, Any]:
    """``again``: a run of this task by this worker broke off on a Redis error, so the
    claim it may have made is dropped first (the task is claimed anew or handed on)."""
    if again:
        rt.ledger.forget_running(msg.job_id, msg.task_no, rt.instance)
    job = rt.ledger.get(msg.job_id)
    plan = job.plan
    task = plan.task(msg.task_no)
    model = plan.cell_model(task.cell)
    assigned = rt.assignments.get(rt.name)
    if assigned is None or assigned[0] != model:
        # fetched from a queue this worker is leaving (its consumer follows the
        # assignment within a moment): hand it to the model's holders rather than load
        # a model the scheduler did not give this worker
        time.sleep(0.2)
        rt.forward(msg, model, job.priority)
        return {"job": msg.job_id, "task": msg.task_no, "forwarded": model}
    state = rt.ledger.claim(msg.job_id, msg.task_no, rt.name, rt.instance)
    if state == "paused":  # the ledger took the task back; it comes again on resume
        return {"job": msg.job_id, "task": msg.task_no, "skipped": state}
    if state != "ok":
        # cancelled/finished job: the task is consumed without rendering
        rt.ledger.finish_task(msg.job_id, msg.task_no)
        return {"job": msg.job_id, "task": msg.task_no, "skipped": state}
    span = task.images
    done = rt.ledger.done_flags(job.id, span)
    todo = [plan.image(i) for i, d in zip(span, done, strict=True) if not d]
    rt.current_task = f"{job.id}/{msg.task_no}"
    rt.task_thread = threading.get_ident()
    try:
        if todo:
            prefix = job.spec.output_prefix or rt.config.output_prefix
            _render_images(rt, job.id, msg.task_no, prefix, todo)
    except (*REDIS_AWAY, StoreAway):
        # not finished: the task runs again once Redis is back (see tasks.render), or
        # another worker takes it over
        raise
    except BaseException:
        rt.ledger.finish_task(job.id, msg.task_no)  # its images are marked failed
        raise
    finally:
        rt.current_task = None
    rt.ledger.finish_task(job.id, msg.task_no)
    rt.stats.tasks += 1
    return {"job": job.id, "task": msg.task_no, "rendered": len(todo)}


def _render_images(
    rt: Runtime, job_id: str, task_no: int, prefix: str, images: list[ImageParams]
) -> None:
    first = images[0]
    indices = [p.index for p in images]
    stage = "load"
    try:
        init_image = None
        mask = None
        inpainted: inpaint.Prepared | None = None
        if first.init_image:
            stage = "input"  # recorded as a load, but not the model's fault
            init_image = _input_picture(rt, first.init_image)
            if first.inpaint is not None:
                inpainted = _prepare_inpaint(rt, first, init_image)
                init_image, mask = inpainted.picture, inpainted.mask
            else:
                init_image = fit_picture(init_image, first.width, first.height)
            stage = "load"
        engine = rt.engine_for(first.model)
        if init_image is not None and not getattr(engine, "takes_init_image", False):
            stage = "input"
            family = getattr(engine, "family", type(engine).__name__)
            raise EngineError(
                f"init_image: model {first.model!r} ({family}) cannot start from a picture "
                "(img2img)"
            )
        if mask is not None and not getattr(engine, "takes_mask", False):
            stage = "input"
            family = getattr(engine, "family", type(engine).__name__)
            raise EngineError(f"inpaint: model {first.model!r} ({family}) cannot inpaint")
        if first.hires is not None and not getattr(engine, "takes_hires", False):
            stage = "input"  # the job's setting, not the model's fault
            family = getattr(engine, "family", type(engine).__name__)
            raise EngineError(f"hires: model {first.model!r} ({family}) has no hires fix")
        loras: tuple[LoraRequest, ...] = ()
        lora_hashes: dict[str, str] = {}
        if first.loras:
            stage = "lora"  # recorded as a load, but not the model's fault
            loras, lora_hashes = _load_loras(rt, engine, first)
        embeddings: tuple[EmbeddingRequest, ...] = ()
        ti_hashes: dict[str, str] = {}
        if first.embeddings and getattr(engine, "takes_embeddings", False):
            stage = "embedding"  # recorded as a load, but not the model's fault
            embeddings, ti_hashes = _load_embeddings(rt, engine, first)
        stage = "render"
        batch = BatchRequest(
            images=tuple(
                ImageRequest(
                    p.prompt,
                    p.negative_prompt,
                    p.seed,
                    subseed=max(p.subseed, 0),
                    subseed_strength=p.subseed_strength,
                )
                for p in images
            ),
            width=first.width,
            height=first.height,
            steps=first.steps,
            cfg_scale=first.cfg_scale,
            sampler_name=first.sampler_name,
            scheduler=first.scheduler,
            loras=loras,
            embeddings=embeddings,
            clip_skip=first.clip_skip,
            init_image=init_image,
            mask=mask,
            masked_content=first.inpaint.masked_content if mask is not None else "original",
            denoising_strength=first.denoising_strength,
            hires=hires_request(first),
            seed_resize_from=first.seed_resize_from,
            eta_noise_seed_delta=first.eta_noise_seed_delta,
        )
        t0 = time.perf_counter()
        with rt.watchdog.stage(f"rendering task {rt.current_task}", first.model) as tick:
            pictures = engine.render(batch, progress=tick)
        if inpainted is not None:  # the picture's own pixels outside the mask (A1111's overlay)
            pictures = [inpaint.finish(p, inpainted) for p in pictures]
        rt.stats.record_render(
            f"{first.model}:{first.width}x{first.height}:{first.steps}",
            time.perf_counter() - t0,
            len(images),
        )
        sha = rt.engine_model[1] if rt.engine_model else ""
        model_hash = sha[:10] or None
        stage = "store"
        extra: dict[str, Any] = {}
        if first.seed_resize_from:  # A1111's place: after the variation seed
            extra["Seed resize from"] = "{}x{}".format(*first.seed_resize_from)
        if first.init_image:  # A1111's place for it: after the model, before the LoRAs
            extra["Denoising strength"] = first.denoising_strength
        hires = hires_parameters(first)
        if "Denoising strength" in hires:
            extra["Denoising strength"] = hires.pop("Denoising strength")
        if getattr(engine, "inpainting_model", False):  # A1111's: after the strength
            extra["Conditional mask weight"] = 1.0
        if first.clip_skip != 1:  # A1111's: after the strength, when it is not 1
            extra["Clip skip"] = first.clip_skip
        if first.eta_noise_seed_delta and first.sampler_name in ANCESTRAL:
            extra["ENSD"] = first.eta_noise_seed_delta  # A1111's: when its sampler reads it
        if inpainted is not None:  # A1111's: Mask mode, Mask blur, Inpaint area, ...
            extra.update(inpainted.params)
        extra.update(hires)
        if first.loras:  # as A1111 writes them: the tags in the prompt, the files' hashes
            extra["Lora hashes"] = ", ".join(f"{n}: {lora_hashes[n][:12]}" for n, _ in first.loras)
        used_by = engine.embeddings_used(batch) if embeddings else [[] for _ in images]
        for p, picture, used in zip(images, pictures, used_by, strict=True):
            if used:  # as A1111 writes them: the embeddings the image's prompts took
                extra["TI hashes"] = ", ".join(f"{n}: {ti_hashes[n][:12]}" for n in used)
            else:
                extra.pop("TI hashes", None)
            own: dict[str, Any] = {}
            if p.subseed_strength:  # A1111's place: after the model, before the strength
                own = {
                    "Variation seed": p.subseed,
                    "Variation seed strength": _weight(p.subseed_strength),
                }
            text = format_parameters(
                prompt=lora_prompt(p.prompt, p.loras),
                negative_prompt=p.negative_prompt,
                steps=p.steps,
                sampler_name=p.sampler_name,
                scheduler=p.scheduler,
                cfg_scale=p.cfg_scale,
                seed=p.seed,
                width=p.width,
                height=p.height,
                model=p.model,
                model_hash=model_hash,
                extra={**own, **extra, "Farm job": job_id, "Farm index": p.index},
            )
            key, data = image_key(prefix, job_id, p.index, p.seed), encode_png(picture, text)

            def put(k: str = key, d: bytes = data) -> None:
                # one attempt is one stage: the pauses between attempts are not a hang
                with rt.watchdog.stage(f"storing {k}"):
                    rt.store.put_bytes(k, d, "image/png")

            put_waiting(put, rt.config.storage_wait, rt.stopping, key)
    except (*REDIS_AWAY, StoreAway):
        raise  # the ledger or the store is away, not the images' fault (see run_render)
    except Exception as exc:
        log.exception("task of job %s images %s..%s failed", job_id, indices[0], indices[-1])
        if isinstance(exc, AddonError) and stage == "render":
            stage = "embedding"  # the engine refused an embedding's file as it rendered
        rt.ledger.record_error(
            job_id,
            task_no,
            indices,
            stage="load" if stage in ADDON_STAGES else stage,
            error=error_text(exc),
            worker=rt.name,
            model=first.model,
            images_failed=True,
        )
        rt.ledger.mark(job_id, indices, ok=False)
        # storage that takes no images, or an add-on file (LoRA, embedding) that does not
        # load, is not the model's fault: the worker stays on the model for other jobs
        if stage not in ADDON_STAGES and not (stage == "store" and isinstance(exc, StorageError)):
            rt.record_failure(first.model)
        raise
    rt.ledger.mark(job_id, indices, ok=True)
    rt.stats.images += len(indices)


# stages whose failures are recorded as loads but are not the model's fault: the job's
# picture or add-on files (LoRAs, embeddings), and settings its model cannot render
ADDON_STAGES = ("lora", "embedding", "input")


def hires_request(p: ImageParams) -> HiresRequest | None:
    """The engine's hires settings of an image's job (None: no hires fix)."""
    hr = p.hires
    if hr is None:
        return None
    return HiresRequest(**hr.model_dump())  # the same fields


def hires_parameters(p: ImageParams) -> dict[str, Any]:
    """A hires image's infotext fields, A1111's names in A1111's order (after the model,
    before the LoRA hashes): ``Denoising strength``, ``Hires upscale`` (or ``Hires
    resize: XxY`` when a resize is given), ``Hires steps`` (only when not 0) and ``Hires
    upscaler``; ``Size`` stays the first pass's, as A1111 writes it."""
    hr = p.hires
    if hr is None:
        return {}
    out: dict[str, Any] = {"Denoising strength": _weight(hr.denoising_strength)}
    if hr.resize_x or hr.resize_y:
        out["Hires resize"] = f"{hr.resize_x}x{hr.resize_y}"
    else:
        out["Hires upscale"] = _weight(hr.scale)
    if hr.steps:
        out["Hires steps"] = hr.steps
    out["Hires upscaler"] = hr.upscaler
    return out


def _input_picture(rt: Runtime, sha: str, field: str = "init_image") -> Image.Image:
    """The input picture ``sha`` (the job's ``field``) as uploaded, fetched into
    ``INPUTS`` once (waiting, as for a store of images, while the store is away)."""
    got: list[Image.Image] = []

    def fetch() -> None:
        got.append(INPUTS.get(sha, rt.store.get_bytes, field))

    with rt.watchdog.stage(f"fetching the input picture of task {rt.current_task}"):
        put_waiting(fetch, rt.config.storage_wait, rt.stopping, f"input {sha}")
    return got[-1]


def _prepare_inpaint(rt: Runtime, first: ImageParams, picture: Image.Image) -> inpaint.Prepared:
    """The task's init picture and mask made ready for inpainting (A1111's geometry:
    ``workers.engine.inpaint.prepare``), once for all the tasks of a job (``PREPARED``)."""
    spec = first.inpaint
    assert spec is not None
    key = (first.init_image, spec, first.width, first.height)
    with _prepared_lock:
        if (prepared := PREPARED.get(key)) is not None:
            PREPARED.move_to_end(key)
            return prepared
    mask = _input_picture(rt, spec.mask, "inpaint.mask")
    try:
        prepared = inpaint.prepare(
            picture,
            mask,
            first.width,
            first.height,
            blur=spec.mask_blur,
            fill=MASKED_CONTENT.index(spec.masked_content),
            invert=spec.invert_mask,
            full_res=spec.only_masked,
            padding=spec.padding,
        )
    except ValueError as exc:
        raise EngineError(f"inpaint: {exc}") from None
    with _prepared_lock:
        PREPARED[key] = prepared
        while len(PREPARED) > PREPARED_MOST:
            PREPARED.popitem(last=False)
    return prepared


def _load_loras(
    rt: Runtime, engine: Any, first: ImageParams
) -> tuple[tuple[LoraRequest, ...], dict[str, str]]:
    """The task's LoRAs fetched into the node's cache like checkpoints (waiting, as for
    a store of images, while the store is away) and merged into the engine's weights (a
    no-op when the engine holds them already); and each one's A1111 hash. A LoraError
    naming the LoRA if one cannot be had or applied."""
    apply = getattr(engine, "apply_loras", None)
    if apply is None:
        family = getattr(engine, "family", type(engine).__name__)
        raise EngineError(f"model {first.model!r} ({family}) takes no LoRA")
    requests: list[LoraRequest] = []
    hashes: dict[str, str] = {}
    with rt.watchdog.stage(f"loading the LoRAs of task {rt.current_task}", first.model) as tick:
        for name, weight in first.loras:
            path, hashes[name] = _fetch_addon(rt, "LoRA", name, LoraError,
                                              lambda n=name: rt.lora_file(n, tick))  # fmt: skip
            requests.append(LoraRequest(name, str(path), weight))
        apply(tuple(requests), tick)
    return tuple(requests), hashes


def _fetch_addon(rt: Runtime, kind: str, name: str, error: type[Exception],
                 fetch: Callable[[], Any]) -> Any:  # fmt: skip
    """What ``fetch`` gives for the add-on file ``name``, tried again while the store is
    away (as a store of images is); ``error`` naming it if it cannot be had."""
    got: list[Any] = []
    try:
        put_waiting(lambda: got.append(fetch()), rt.config.storage_wait, rt.stopping,
                    f"{kind} {name}")  # fmt: skip
    except (*REDIS_AWAY, StoreAway):
        raise
    except Exception as exc:
        raise error(f"{kind} {name!r}: {error_text(exc)}") from exc
    return got[-1]


def _load_embeddings(
    rt: Runtime, engine: Any, first: ImageParams
) -> tuple[tuple[EmbeddingRequest, ...], dict[str, str]]:
    """The task's embeddings made for the engine's family, fetched into the node's cache
    like checkpoints (waiting while the store is away), and each one's A1111 hash (the
    sha256 of the file as it was added). Those made for another family are left out, so
    their names stay text, as in A1111 (a sweep over models of two families lists both
    kinds). An EmbeddingError naming the embedding if one cannot be had."""
    family = getattr(engine, "family", "")
    requests: list[EmbeddingRequest] = []
    hashes: dict[str, str] = {}
    with rt.watchdog.stage(
        f"loading the embeddings of task {rt.current_task}", first.model
    ) as tick:
        for name in first.embeddings:
            got = _fetch_addon(rt, "embedding", name, EmbeddingError,
                               lambda n=name: rt.embedding_file(n, family, tick))  # fmt: skip
            if got is None:
                continue
            path, entry = got
            requests.append(EmbeddingRequest(name, str(path)))
            hashes[name] = entry.source_sha256 or entry.sha256
    return tuple(requests), hashes


def lora_prompt(prompt: str, loras: tuple[tuple[str, float], ...]) -> str:
    """The prompt as A1111 shows it in an image's parameters: its ``<lora:name:weight>``
    tags at the end (A1111 reads them back as the same LoRAs)."""
    tags = " ".join(f"<lora:{name}:{_weight(weight)}>" for name, weight in loras)
    return f"{prompt.rstrip()} {tags}".lstrip() if tags else prompt


def _weight(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
