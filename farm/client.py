"""A small HTTP client of the farm's API (standard library only), used by the CLI."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, detail: Any):
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {format_detail(detail)}")


def format_detail(detail: Any) -> str:
    if isinstance(detail, dict) and "detail" in detail:
        detail = detail["detail"]
    if isinstance(detail, list):
        return "; ".join(
            f"{d.get('field', '?')}: {d.get('msg', d)}" if isinstance(d, dict) else str(d)
            for d in detail
        )
    return str(detail)


class FarmClient:
    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base = base_url.rstrip("/")
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """``body`` sent as JSON, or ``raw`` bytes as ``content_type``."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                detail = json.loads(raw)
            except ValueError:
                detail = raw.decode(errors="replace")
            raise ApiError(exc.code, detail) from None

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/v1/jobs", spec)

    def upload_input(self, data: bytes, mask: bool = False) -> dict[str, Any]:
        """Store a picture (PNG, JPEG or WebP file bytes) for img2img: ``{"init_image":
        sha256, "width", "height"}``, the sha256 for a job's ``init_image`` (``mask``: an
        inpainting mask, for its ``inpaint.mask``)."""
        path = "/v1/inputs?mask=true" if mask else "/v1/inputs"
        return self.request("POST", path, raw=data, content_type="application/octet-stream")

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}")

    def jobs(self, limit: int = 20, state: str | None = None) -> list[dict[str, Any]]:
        query = f"?limit={limit}" + (f"&state={state}" if state else "")
        return self.request("GET", "/v1/jobs" + query)

    def stats(self) -> dict[str, Any]:
        """Jobs per state, images outstanding, images/s, the farm's totals, live workers."""
        return self.request("GET", "/v1/stats")

    def workers(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/workers")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel")

    def control(self, job_id: str, action: str) -> dict[str, Any]:
        """pause, resume or retry."""
        return self.request("POST", f"/v1/jobs/{job_id}/{action}")

    def set_priority(self, job_id: str, priority: int) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/priority", {"priority": priority})

    def images(self, job_id: str, offset: int = 0, limit: int = 1000) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/images?offset={offset}&limit={limit}")

    def errors(self, job_id: str, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        return self.request("GET", f"/v1/jobs/{job_id}/errors?offset={offset}&limit={limit}")

    def all_images(self, job_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            page = self.images(job_id, offset)
            out.extend(page["images"])
            if not page.get("next_offset"):
                return out
            offset = page["next_offset"]

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        interval: float = 0.5,
    ) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["state"] in ("done", "failed", "cancelled"):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            time.sleep(interval)
