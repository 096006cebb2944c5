"""The OpenAPI document as the service behaves: errors are OpenAI's envelope with the statuses
millrace answers (400, not FastAPI's 422), and both ways to send an API key (declared here,
not as FastAPI security dependencies: those would run on every request for nothing)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from millrace.protocol import ErrorEnvelope

ERRORS = {
    "400": "Invalid request (parameter named in `error.param`)",
    "401": "No API key, or an unknown one",
    "404": "No such object (or not the caller's)",
    "408": "The request's headers came too slowly",
    "409": "Not possible in the object's current state",
    "413": "The request body is too large",
    "429": "Rate limit reached (see Retry-After)",
    "431": "Request headers too large",
    "503": "The broker or Redis is away, or the gateway is at capacity (see Retry-After)",
}
ADMIN_ERRORS = {"403": "The key is not an admin key"}
ADMIN_PATHS = ("/admin", "/plai/batches/check-status")
SIGNED_ERRORS = {"403": "The signature is not valid for this file, or has expired"}


def document(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                         description="An OpenAI-compatible Batch API on Kafka.")
    envelope = ErrorEnvelope.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(envelope.pop("$defs", {}))
    schemas["ErrorEnvelope"] = envelope
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schema["components"]["securitySchemes"] = {
        "HTTPBearer": {"type": "http", "scheme": "bearer",
                       "description": "an API key: `Authorization: Bearer sk-...`"},
        "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key",
                         "description": "an API key, as PromptLoop clients send it"},
    }
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}
    for path, operations in schema.get("paths", {}).items():
        if path == "/health":
            continue
        signed = path.startswith("/signed/")  # the signature is the credential
        for operation in operations.values():
            if not signed:
                operation["security"] = [{"HTTPBearer": []}, {"APIKeyHeader": []}]
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            extra = ADMIN_ERRORS if path.startswith(ADMIN_PATHS) else (
                SIGNED_ERRORS if signed else {})
            errors = {**ERRORS, **extra}
            for code, description in errors.items():
                responses.setdefault(code, {"description": description, "content": ref})
    app.openapi_schema = schema
    return schema
