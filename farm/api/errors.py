"""Error bodies of the HTTP API and the exception handlers that produce them.

Every 4xx answer is JSON: ``{"detail": [{"field": "width", "msg": "..."}]}`` for a value
the client sent that is not valid (``field`` is the dotted location inside the body or
the query/path parameter's name), or ``{"detail": "..."}`` for anything else. A Redis
that cannot be reached gives 503, never 500.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from farm.spec import SWEEPABLE

_SOURCES = {"body", "query", "path", "header", "cookie"}
# pydantic names the member of a union it tried (``prompt.str``, ``prompt.list[str]``)
_UNION_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}
# JobSpec's sweep validator names the swept field in its message: "width[2]: must ..."
_SWEEP_MSG = re.compile(r"^(?P<name>[a-z_]+)(?P<index>\[\d+\])?: (?P<msg>.*)$", re.DOTALL)
_NOT_AN_OBJECT = {"model_attributes_type", "model_type", "dict_type"}
_SWEEP_KEY_MSG = re.compile(r"^'(?P<name>[^']*)' cannot be swept")


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped, so that no string (not even a lone surrogate that a
    client sent as ``\\ud800``) can make rendering an answer fail."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class FieldError(Exception):
    """A request value that is not valid, found by the API itself (not by pydantic)."""

    def __init__(self, field: str, msg: str, status_code: int = 422) -> None:
        super().__init__(f"{field}: {msg}")
        self.field = field
        self.msg = msg
        self.status_code = status_code


def field_name(loc: Sequence[Any]) -> str:
    """``("body", "sweep", "model", 2)`` -> ``sweep.model[2]``; ``("body",)`` -> ``body``."""
    parts = list(loc)
    if parts and parts[0] in _SOURCES:
        source = parts.pop(0)
        if not parts:
            return str(source)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS or "[" in str(part) or str(part).startswith("function-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def _message(error: Mapping[str, Any]) -> str:
    msg = str(error.get("msg", "invalid value"))
    if error.get("type") == "json_invalid":
        ctx = error.get("ctx") or {}
        where = error.get("loc", ())[-1:] or ("?",)
        return f"JSON decode error at position {where[0]}: {ctx.get('error', msg)}"
    return msg.removeprefix("Value error, ")


def format_errors(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """pydantic/FastAPI error dicts -> ``[{"field", "msg"}]`` without the raw input."""
    out: list[dict[str, str]] = []
    union_fields: set[str] = set()
    for error in errors:
        loc = tuple(error.get("loc", ()))
        field = field_name(loc)
        msg = _message(error)
        if error.get("type") == "json_invalid":
            field = "body"
        elif field == "sweep":
            field, msg = _sweep_field(msg)
        elif field == "body" and error.get("type") in _NOT_AN_OBJECT:
            msg = f"{msg}: send the job spec as a JSON object (Content-Type: application/json)"
        item = {"field": field, "msg": msg}
        if item in out:
            continue
        if _is_union_branch(loc):  # "prompt": one message for the str and list[str] tries
            if field in union_fields:
                prev = next(i for i in out if i["field"] == field)
                prev["msg"] += f", or {msg[0].lower()}{msg[1:]}"
                continue
            union_fields.add(field)
        out.append(item)
    return out


def _is_union_branch(loc: Sequence[Any]) -> bool:
    return any(isinstance(p, str) and (p in _UNION_TAGS or "[" in p) for p in loc)


def _sweep_field(msg: str) -> tuple[str, str]:
    """Point a sweep error at the swept field (``sweep.cfg_scale[1]``) where it says which."""
    m = _SWEEP_MSG.match(msg)
    if m and m["name"] in SWEEPABLE:
        return f"sweep.{m['name']}{m['index'] or ''}", m["msg"]
    k = _SWEEP_KEY_MSG.match(msg)
    if k:
        return f"sweep.{k['name']}", msg
    return "sweep", msg


def validation_response(errors: list[dict[str, str]], status_code: int = 422) -> JSONResponse:
    return SafeJSONResponse({"detail": errors}, status_code=status_code)


async def _request_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    return validation_response(format_errors(exc.errors()))


async def _field_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FieldError)
    return validation_response([{"field": exc.field, "msg": exc.msg}], exc.status_code)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail
    if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI's "error parsing"
        cause = exc.__cause__
        detail = f"the body is not valid JSON: {type(cause).__name__}: {str(cause)[:200]}"
    return SafeJSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    kind = type(exc).__name__
    return SafeJSONResponse(
        {"detail": f"the job database (Redis) is unavailable: {kind}: {exc}"}, status_code=503
    )


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the bodies described above."""
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(ValidationError, _request_validation)
    app.add_exception_handler(FieldError, _field_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(redis.RedisError, _redis_error)


def check_encodable(value: Any, field: str = "") -> None:
    """Every string must be valid UTF-8 (JSON lets a client send a lone surrogate)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise FieldError(
                field or "body", "must be valid unicode (no lone surrogates)"
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_encodable(k, field or "body")
            check_encodable(v, f"{field}.{k}" if field else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_encodable(v, f"{field}[{i}]")
