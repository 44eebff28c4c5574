"""HTTP pieces every server of ours shares (gateway, admin API, feedback webhook): OpenAI-style
error bodies ({"error": {"message", "type", "param", "code"}} with the right status), the bearer
token of a request, and the one JSON body parser (size limit, orjson, a pydantic model, the model
documented in the OpenAPI document)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("clora.errors")
M = TypeVar("M")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable", 500: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def unauthorized() -> APIError:
    return APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    code="model_not_found", param="model")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response(400, f"Invalid request: {first['msg']}", "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(redis.exceptions.ConnectionError)  # also BusyLoadingError: an AOF being replayed
    @app.exception_handler(redis.exceptions.TimeoutError)
    async def _redis_unavailable(_: Request, exc: Exception) -> JSONResponse:
        # Redis restarting is an outage of a dependency, not a bug of this request: retry shortly.
        log.warning("redis unavailable: %s", exc)
        return error_response(503, "A storage dependency is unavailable; retry shortly.", "redis_unavailable",
                              headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "Internal error; the request was not served.", "internal_error")


def bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body exceeds {limit} bytes.", "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"Request body exceeds {limit} bytes.", "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:  # also raised for invalid UTF-8
        raise APIError(400, "Request body is not valid JSON.", "invalid_json") from None


def validation_error(exc: ValidationError, what: str, code: str) -> APIError:
    """A pydantic error as a 400 naming the first offending field."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return APIError(400, f"Invalid {what}: {param}: {first['msg']}", code, param)


# Schemas of the bodies we parse ourselves: FastAPI documents only the ones it parses.
_BODY_SCHEMAS: dict[str, dict[str, Any]] = {}


@dataclass
class Body(Generic[M]):
    value: M  # the validated body
    raw: Any  # the JSON as sent (the chat endpoint forwards vLLM's extras from it unchanged)


class JsonBody(Generic[M]):
    """The one body parser, as a FastAPI dependency: read at most `limit_of(request)` bytes (413
    beyond, before reading the rest), parse with orjson, validate with `schema` (or `validate`),
    and answer 400 naming the field otherwise. `openapi` documents the body on its route."""

    def __init__(self, schema: Any, limit_of: Callable[[Request], int], *, name: str | None = None,
                 validate: Callable[[Any], M] | None = None, what: str = "request", code: str = "invalid_request",
                 object_only: bool = False):
        self.adapter = TypeAdapter(schema)
        self.limit_of, self.validate, self.what, self.code = limit_of, validate, what, code
        self.object_only = object_only
        name = name or getattr(schema, "__name__", "Body")
        document = self.adapter.json_schema(ref_template="#/components/schemas/{model}")
        _BODY_SCHEMAS.update(document.pop("$defs", {}))
        _BODY_SCHEMAS[name] = document
        self.openapi = {"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{name}"}}}}}

    def parse(self, raw: bytes) -> Body[M]:
        data = parse_json(raw)
        if self.object_only and not isinstance(data, dict):
            raise APIError(400, "Request body must be a JSON object.", "invalid_request")
        try:
            value = self.validate(data) if self.validate else self.adapter.validate_python(data)
        except ValidationError as exc:
            raise validation_error(exc, self.what, self.code) from None
        return Body(value, data)

    async def __call__(self, request: Request) -> Body[M]:
        return self.parse(await read_body(request, self.limit_of(request)))


def document_bodies(app: FastAPI) -> None:
    """Add the schemas of `JsonBody` bodies to the app's OpenAPI components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(_BODY_SCHEMAS)
        return app.openapi_schema

    app.openapi = openapi
