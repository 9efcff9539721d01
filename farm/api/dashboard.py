"""The job dashboard: one HTML page (``GET /dashboard``) that polls the farm's JSON API.

The page's markup, CSS and JS live in ``farm/api/static/`` and go out as one
self-contained HTML document (no CDN, no other request than the API's own: farms run on
networks with no internet). Its style and script carry a fresh nonce per response and the
Content-Security-Policy allows only those, fetches to this origin and images (presigned
S3 URLs may be on any host), so even if a prompt, tag, error text or worker name reached
the page as markup, nothing in it could run. The script puts such text in as text anyway.
"""

from __future__ import annotations

import functools
import secrets
from importlib import resources

from fastapi import APIRouter
from starlette.responses import HTMLResponse, RedirectResponse, Response

PATH = "/dashboard"
router = APIRouter(include_in_schema=False)


@functools.cache
def _asset(name: str) -> str:
    return resources.files("farm.api").joinpath("static", name).read_text("utf-8")


@functools.cache
def _template() -> str:
    """The page with the CSS and JS inlined, a ``{{nonce}}`` left to fill per response."""
    script, style = _asset("dashboard.js"), _asset("dashboard.css")
    for name, text, end in (
        ("dashboard.js", script, "</script"),
        ("dashboard.css", style, "</style"),
    ):
        if end in text.lower():  # it would end the inline element early
            raise ValueError(f"static/{name} must not contain {end!r}")
    html = _asset("dashboard.html")
    return html.replace("{{style}}", style).replace("{{script}}", script)


def security_headers(nonce: str) -> dict[str, str]:
    """What the page may load and do: its own nonced style and script, fetches to this
    origin, images from anywhere (never scripts), no framing, no referrer sent along."""
    csp = "; ".join(
        (
            "default-src 'none'",
            f"script-src 'nonce-{nonce}'",
            f"style-src 'nonce-{nonce}'",
            "connect-src 'self'",
            "img-src 'self' data: http: https:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


@router.get(PATH)
def dashboard() -> Response:
    """The dashboard page."""
    nonce = secrets.token_urlsafe(18)
    html = _template().replace("{{nonce}}", nonce)
    return HTMLResponse(html, headers=security_headers(nonce))


@router.get("/")
def root() -> Response:
    """The API's root leads to the dashboard."""
    return RedirectResponse(PATH, status_code=307)
