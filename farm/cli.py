"""``farm``: the command line of the render farm.

Commands that talk to a running farm (submit, status, errors, cancel...) use its HTTP API at
``FARM_API_URL`` (default ``http://FARM_API_HOST:FARM_API_PORT``); commands that run a
part of the farm (up, worker, scheduler, api) read the ``FARM_*`` settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from farm.client import ApiError, FarmClient
from farm.config import Config, load

# (foreground, shape, background, size, position) in the demo model's caption grammar
DEMO_SCENES = [
    ("red", "circle", "blue", None, None),
    ("yellow", "triangle", "purple", None, None),
    ("white", "square", "black", None, None),
    ("green", "circle", "orange", None, None),
    ("blue", "triangle", "white", "large", None),
    ("orange", "square", "green", "small", None),
    ("purple", "circle", "yellow", None, "left"),
    ("black", "triangle", "red", None, "top"),
]


def demo_prompts() -> list[str]:
    from workers.demo.dataset import caption

    return [caption(fg, shape, bg, size, pos) for fg, shape, bg, size, pos in DEMO_SCENES]


def _api_url(config: Config) -> str:
    return os.environ.get("FARM_API_URL") or f"http://{config.api_host}:{config.api_port}"


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def seed_resize_arg(value: str | None) -> dict[str, Any]:
    """``--seed-resize-from WxH`` as the spec's two fields."""
    if value is None:
        return {}
    w, sep, h = value.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise SystemExit(f"farm submit: --seed-resize-from {value!r}: give WIDTHxHEIGHT, 768x512")
    return {"seed_resize_from_w": int(w), "seed_resize_from_h": int(h)}


def spec_from_args(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if args.spec:
        text = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text()
        try:
            spec = json.loads(text)
        except ValueError as exc:
            raise SystemExit(f"farm submit: {args.spec} is not valid JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise SystemExit(f"farm submit: {args.spec} must hold a JSON object")
    flags = {
        "model": args.model,
        "negative_prompt": args.negative_prompt,
        "count": args.count,
        "seed": args.seed,
        "subseed": args.subseed,
        "subseed_strength": args.subseed_strength,
        "eta_noise_seed_delta": args.ensd,
        **seed_resize_arg(args.seed_resize_from),
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "sampler_name": args.sampler,
        "scheduler": args.scheduler,
        "batch_size": args.batch_size,
        "priority": args.priority,
        "output_prefix": args.output_prefix,
        "denoising_strength": args.denoising_strength,
    }
    spec.update({k: v for k, v in flags.items() if v is not None})
    if args.prompt:
        spec["prompt"] = args.prompt[0] if len(args.prompt) == 1 else args.prompt
    if args.tag:
        spec["tags"] = args.tag
    if args.lora:
        spec["loras"] = [lora_arg(item) for item in args.lora]
    hires = {
        "scale": args.hires_scale,
        "steps": args.hires_steps,
        "denoising_strength": args.hires_denoise,
        "upscaler": args.hires_upscaler,
    }
    if any(v is not None for v in hires.values()):  # hires fix: the rest from its defaults
        base = spec.get("hires") if isinstance(spec.get("hires"), dict) else {}
        spec["hires"] = {**base, **{k: v for k, v in hires.items() if v is not None}}
    inpaint = {
        "mask_blur": args.mask_blur,
        "masked_content": args.masked_content,
        "invert_mask": args.invert_mask or None,
        "only_masked": args.only_masked or None,
        "padding": args.padding,
    }
    if args.mask or any(v is not None for v in inpaint.values()):
        base = spec.get("inpaint") if isinstance(spec.get("inpaint"), dict) else {}
        spec["inpaint"] = {**base, **{k: v for k, v in inpaint.items() if v is not None}}
    for item in args.sweep or []:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"farm submit: --sweep {item!r}: use FIELD=V1,V2,...")
        spec.setdefault("sweep", {})[name] = [_parse_value(v) for v in values.split(",")]
    spec.setdefault("model", config.default_model)
    if "prompt" not in spec:
        raise SystemExit("farm submit: give --prompt or a spec file with a prompt")
    return spec


def lora_arg(item: str) -> dict[str, Any]:
    """``--lora NAME[:WEIGHT]`` -> ``{"name": NAME, "weight": WEIGHT}`` (weight 1 if none)."""
    name, sep, weight = item.partition(":")
    if not name or (sep and not weight):
        raise SystemExit(f"farm submit: --lora {item!r}: use NAME or NAME:WEIGHT")
    try:
        return {"name": name, "weight": float(weight) if sep else 1.0}
    except ValueError:
        raise SystemExit(f"farm submit: --lora {item!r}: the weight must be a number") from None


def progress_bar(job: dict[str, Any]) -> Any:
    from tqdm import tqdm

    return tqdm(total=job["total"], unit="img", desc=f"job {job['id']}", dynamic_ncols=True)


def wait_with_bar(client: FarmClient, job_id: str, timeout: float | None = None) -> dict[str, Any]:
    bar = None

    def update(job: dict[str, Any]) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(job)
        bar.n = job["done"] + job["failed"]
        bar.set_postfix(state=job["state"], failed=job["failed"], refresh=False)
        bar.refresh()

    try:
        return client.wait(job_id, timeout=timeout, on_progress=update)
    finally:
        if bar is not None:
            bar.close()


def cmd_submit(args: argparse.Namespace, config: Config) -> int:
    client = FarmClient(_api_url(config))
    spec = spec_from_args(args, config)
    if args.init_image:  # img2img: the picture is uploaded first, the job names its hash
        try:
            data = Path(args.init_image).read_bytes()
        except OSError as exc:
            raise SystemExit(f"farm submit: --init-image {args.init_image}: {exc}") from None
        spec["init_image"] = client.upload_input(data)["init_image"]
    if args.mask:  # inpainting: the mask is uploaded the same way
        try:
            data = Path(args.mask).read_bytes()
        except OSError as exc:
            raise SystemExit(f"farm submit: --mask {args.mask}: {exc}") from None
        spec["inpaint"]["mask"] = client.upload_input(data, mask=True)["init_image"]
    job = client.submit(spec)
    print(f"job {job['id']}: {job['total']} images in {job['tasks']} tasks, seed {job['seed']}")
    if args.wait:
        job = wait_with_bar(client, job["id"])
        print(f"job {job['id']} {job['state']}: {job['done']} done, {job['failed']} failed")
        if job["state"] != "done" and job.get("last_error"):
            print(f"last error: {format_error(job['last_error'])}")
        return 0 if job["state"] == "done" else 1
    return 0


def format_error(e: dict[str, Any]) -> str:
    """One line of a job's failure list."""
    at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
    images = e["images"]
    if e["task"] is None:
        what = "ahead of its tasks"
    else:
        span = f"image {images[0]}" if len(images) == 1 else f"images {images[0]}..{images[-1]}"
        what = f"task {e['task']} ({span}, {'failed' if e['images_failed'] else 'sent again'})"
    return f"{at}  {what}  {e['stage']} on {e['worker']} [{e['model']}]: {e['error']}"


def cmd_errors(args: argparse.Namespace, config: Config) -> int:
    page = FarmClient(_api_url(config)).errors(args.job, limit=args.limit)
    shown = len(page["errors"])
    print(f"job {page['job']}: {page['total']} failures recorded, the last {shown} shown")
    for e in page["errors"]:
        print(format_error(e))
    return 0


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    client = FarmClient(_api_url(config))
    if args.job:
        print(json.dumps(client.job(args.job), indent=2))
        return 0
    for job in client.jobs(args.limit):
        eta = "-" if job["eta_s"] is None else f"{job['eta_s']:.0f}s"
        print(
            f"{job['id']}  {job['state']:<9} {job['done']:>7}/{job['total']:<7} "
            f"failed {job['failed']:<5} {job['images_per_s']:>7.2f} img/s  eta {eta:>6}  "
            f"{job['model']}"
        )
    return 0


def cmd_watch(args: argparse.Namespace, config: Config) -> int:
    from farm import watch

    if args.interval <= 0:
        raise ValueError(f"--interval must be above 0 s, got {args.interval}")
    if args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    client = FarmClient(_api_url(config))
    return watch.run(
        client, args.job, interval=args.interval, until_idle=args.until_idle, most=args.limit
    )


def cmd_cancel(args: argparse.Namespace, config: Config) -> int:
    job = FarmClient(_api_url(config)).cancel(args.job)
    print(f"job {job['id']} {job['state']}: {job['done']} images kept")
    return 0


def cmd_control(args: argparse.Namespace, config: Config) -> int:
    job = FarmClient(_api_url(config)).control(args.job, args.cmd)
    print(f"job {job['id']} {job['state']}: {job['done']} done, {job['failed']} failed")
    return 0


def cmd_priority(args: argparse.Namespace, config: Config) -> int:
    job = FarmClient(_api_url(config)).set_priority(args.job, args.priority)
    print(f"job {job['id']} priority {job['priority']}")
    return 0


def cmd_worker(args: argparse.Namespace, config: Config) -> int:
    from workers.launcher import run

    return run(args.devices, config, args.loglevel)


def cmd_scheduler(args: argparse.Namespace, config: Config) -> int:
    from scheduler.service import Scheduler

    sched = Scheduler(config)
    signal.signal(signal.SIGTERM, lambda *_: sched.stop())
    try:
        sched.run()
    except KeyboardInterrupt:
        sched.stop()
    return 0


def cmd_api(args: argparse.Namespace, config: Config) -> int:
    from farm.api.__main__ import serve

    serve(config)
    return 0


def cmd_models(args: argparse.Namespace, config: Config) -> int:
    from farm.models import ModelRegistry
    from farm.redis_client import connect

    client = connect(config)
    if args.models_cmd == "add":
        from farm.stack import register_model

        entry = register_model(config, client, Path(args.path), args.name)
        if entry.engine == "embedding":
            print(
                f"embedding {entry.name}: {entry.family}, {entry.vectors} vectors, sha256 "
                f"{entry.sha256}, {entry.size} bytes"
            )
        else:
            kind = "LoRA" if entry.engine == "lora" else "model"
            print(f"{kind} {entry.name}: {entry.engine}, sha256 {entry.sha256}, {entry.size} bytes")
        return 0
    for entry in ModelRegistry(client, config.namespace).list():
        sha = entry.sha256[:12] if entry.sha256 else "-"
        print(f"{entry.name:<24} {entry.engine:<10} {sha:<12} {entry.size:>12}")
    return 0


def cmd_config(args: argparse.Namespace, config: Config) -> int:
    for name, value in config.items():
        print(f"{name}={value}")
    return 0


def _serve_stack(args: argparse.Namespace, config: Config, job: dict[str, Any] | None) -> int:
    from farm.stack import Stack

    stack = Stack(config, devices=args.devices, flower=not args.no_flower)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Ctrl-C (SIGINT) stops the stack even where it was ignored at start: a shell without
    # job control starts background commands (`farm up &`) with SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stack.start()
        for what, where in stack.describe().items():
            print(f"{what:>20}: {where}")
        print("waiting for workers...", flush=True)
        if not stack.wait_for_workers(1, timeout=180):
            print(f"no worker came up; see {stack.log_dir}", file=sys.stderr)
            return 1
        if job is None:
            print("farm is up; Ctrl-C stops it", flush=True)
            stop.wait()
            return 0
        return run_demo_job(FarmClient(stack.api_url), job, stack)
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopping...", flush=True)
        stack.stop()


def run_demo_job(client: FarmClient, spec: dict[str, Any], stack: Any) -> int:
    job = client.submit(spec)
    print(f"job {job['id']}: {job['total']} images", flush=True)
    job = wait_with_bar(client, job["id"], timeout=900)
    print(f"job {job['id']} {job['state']}: {job['done']} done, {job['failed']} failed")
    images = client.all_images(job["id"])
    print(f"{len(images)} images in {stack.describe()['storage']}")
    if images:
        sheet = write_contact_sheet(stack.config, images, spec["count"])
        print(f"contact sheet: {sheet}")
    return 0 if job["state"] == "done" and len(images) == job["total"] else 1


def write_contact_sheet(config: Config, images: list[dict[str, Any]], cols: int) -> Path:
    """Prompts down, seeds across, read back from storage like any client would."""
    import io

    from PIL import Image

    from storage import open_store
    from workers.demo.contact_sheet import make_contact_sheet

    store = open_store(config.storage_url)
    pictures = [Image.open(io.BytesIO(store.get_bytes(img["key"]))) for img in images]
    labels = [f"{img['prompt']} (seed {img['seed']})" for img in images]
    path = Path(config.data_dir) / "demo" / "contact-sheet.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    make_contact_sheet(pictures, cols, labels).save(path)
    return path


def cmd_up(args: argparse.Namespace, config: Config) -> int:
    return _serve_stack(args, config, None)


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    from farm.redis_server import free_port

    # the demo must not collide with a farm (or anything else) on the default ports
    if not os.environ.get("FARM_API_PORT"):
        config = replace(config, api_port=free_port())
    if not os.environ.get("FARM_FLOWER_PORT"):
        config = replace(config, flower_port=free_port())
    from workers.demo import DEMO_MODEL_NAME, demo_render_defaults

    spec: dict[str, Any] = {
        "model": config.default_model,
        "prompt": demo_prompts(),
        "count": args.count,
        "seed": 1,
        "width": 64,
        "height": 64,
        "steps": 12,
        "cfg_scale": 6.0,
        "sampler_name": "DPM++ 2M",
        "batch_size": 8,
        "output_prefix": "demo",
    }
    if config.default_model == DEMO_MODEL_NAME:
        spec.update(demo_render_defaults())
    return _serve_stack(args, config, spec)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="farm", description="render farm for diffusion images")
    sub = p.add_subparsers(dest="cmd", required=True)

    for name, helptext in (
        ("up", "run the embedded farm in the foreground"),
        ("demo", "run a small job end to end on the embedded farm"),
    ):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--devices", default="auto", help="auto, cpu:N or cuda:0,1")
        sp.add_argument("--no-flower", action="store_true", help="do not start Flower")
        if name == "demo":
            sp.add_argument("--count", type=int, default=4, help="seeds per prompt")

    sp = sub.add_parser("submit", help="submit a job (spec file and/or flags)")
    sp.add_argument("spec", nargs="?", help="JSON spec file, or - for stdin")
    sp.add_argument("--model")
    sp.add_argument("--prompt", action="append", help="repeat for several prompts")
    sp.add_argument("--negative-prompt")
    sp.add_argument("--count", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument(
        "--subseed", type=int, metavar="N", help="variation seed (-1: one picked at submit)"
    )
    sp.add_argument(
        "--subseed-strength",
        type=float,
        metavar="S",
        help="variation seeds: 0-1, how far each image's noise goes toward its subseed's; "
        "the images keep --seed and their subseeds count up",
    )
    sp.add_argument(
        "--seed-resize-from",
        metavar="WxH",
        help="draw each image's seed noise as for a WxH picture, set in the middle of its own "
        "(A1111's Resize seed from)",
    )
    sp.add_argument(
        "--ensd",
        type=int,
        metavar="N",
        help="A1111's eta noise seed delta: Euler a's noise after the first from seed + N",
    )
    sp.add_argument("--width", type=int)
    sp.add_argument("--height", type=int)
    sp.add_argument("--steps", type=int)
    sp.add_argument("--cfg-scale", type=float)
    sp.add_argument("--sampler")
    sp.add_argument("--scheduler")
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--priority", type=int)
    sp.add_argument("--sweep", action="append", help="FIELD=V1,V2 (repeatable)")
    sp.add_argument("--output-prefix")
    sp.add_argument("--tag", action="append")
    sp.add_argument(
        "--lora", action="append", metavar="NAME[:WEIGHT]", help="a registered LoRA (repeatable)"
    )
    sp.add_argument(
        "--init-image",
        metavar="FILE",
        help="img2img: start every image from this PNG, JPEG or WebP (uploaded first)",
    )
    sp.add_argument(
        "--denoising-strength",
        type=float,
        metavar="S",
        help="img2img: how much of the picture is renewed, above 0 and at most 1 (0.75)",
    )
    sp.add_argument(
        "--mask",
        metavar="FILE",
        help="inpainting (with --init-image): repaint where this picture is white (or opaque, "
        "where it has transparency)",
    )
    sp.add_argument("--mask-blur", type=int, metavar="N", help="inpainting: edge blur (4)")
    sp.add_argument(
        "--masked-content",
        metavar="C",
        help="inpainting: what the masked part starts from: fill, original (default), "
        "latent noise or latent nothing",
    )
    sp.add_argument(
        "--invert-mask", action="store_true", help="inpainting: repaint the unmasked part"
    )
    sp.add_argument(
        "--only-masked",
        action="store_true",
        help="inpainting: render the masked part's box at the size given and paste it back",
    )
    sp.add_argument(
        "--padding", type=int, metavar="N", help="inpainting: --only-masked's padding (32)"
    )
    sp.add_argument(
        "--hires-scale",
        type=float,
        metavar="X",
        help="hires fix: render at the size given, upscale by X (1-4, 2 if another --hires-* "
        "flag is given) and sample again; the PNGs have the larger size",
    )
    sp.add_argument(
        "--hires-steps", type=int, metavar="N", help="hires fix: second pass steps (0: --steps)"
    )
    sp.add_argument(
        "--hires-denoise",
        type=float,
        metavar="S",
        help="hires fix: the second pass's denoising strength, above 0, at most 1 (0.7)",
    )
    sp.add_argument(
        "--hires-upscaler",
        metavar="U",
        help="hires fix: Latent (default), Latent (bicubic), ..., Lanczos, Nearest or None",
    )
    sp.add_argument("--wait", action="store_true", help="show a progress bar until it ends")

    sp = sub.add_parser("status", help="list jobs, or show one")
    sp.add_argument("job", nargs="?")
    sp.add_argument("--limit", type=int, default=20)

    sp = sub.add_parser("errors", help="why runs of a job's tasks failed, newest first")
    sp.add_argument("job")
    sp.add_argument("--limit", type=int, default=20, help="at most 100")

    sp = sub.add_parser("watch", help="progress bars of jobs (or of every unfinished job)")
    sp.add_argument("job", nargs="*", help="jobs to follow until they end (default: all)")
    sp.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    sp.add_argument("--limit", type=int, default=20, help="most bars shown at once")
    sp.add_argument(
        "--until-idle",
        action="store_true",
        help="with no job given, end when no job is queued or running",
    )

    sp = sub.add_parser("cancel", help="cancel a job (its finished images stay)")
    sp.add_argument("job")

    for name, helptext in (
        ("pause", "pause a job: no task of it starts until resume"),
        ("resume", "resume a paused job"),
        ("retry", "render a job's failed images again"),
    ):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("job")

    sp = sub.add_parser("priority", help="change a job's priority (0-100), also while it runs")
    sp.add_argument("job")
    sp.add_argument("priority", type=int)

    sp = sub.add_parser("worker", help="start one worker process per device")
    sp.add_argument("--devices", default="auto", help="auto, cpu:N or cuda:0,1")
    sp.add_argument("--loglevel", default="INFO")

    sub.add_parser("scheduler", help="run the scheduler loop")
    sub.add_parser("api", help="serve the HTTP API")
    sub.add_parser("config", help="print the effective FARM_* settings")

    sp = sub.add_parser("models", help="manage models")
    msub = sp.add_subparsers(dest="models_cmd", required=True)
    ap = msub.add_parser(
        "add", help="store a checkpoint, a LoRA or an embedding and register a name for it"
    )
    ap.add_argument("path")
    ap.add_argument("--name", required=True)
    msub.add_parser("list", help="list registered models")
    return p


COMMANDS = {
    "up": cmd_up,
    "demo": cmd_demo,
    "submit": cmd_submit,
    "status": cmd_status,
    "errors": cmd_errors,
    "watch": cmd_watch,
    "cancel": cmd_cancel,
    "pause": cmd_control,
    "resume": cmd_control,
    "retry": cmd_control,
    "priority": cmd_priority,
    "worker": cmd_worker,
    "scheduler": cmd_scheduler,
    "api": cmd_api,
    "config": cmd_config,
    "models": cmd_models,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        config = load()
        return COMMANDS[args.cmd](args, config)
    except ApiError as exc:
        print(f"farm {args.cmd}: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RedisError) as exc:
        print(f"farm {args.cmd}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
