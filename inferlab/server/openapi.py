"""The OpenAPI document as the server answers: a client mistake is a 400 with OpenAI's error body
(FastAPI would declare its own 422 validation error, which this server never sends), and each
operation lists the other errors it can answer with."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERRORS = {"400": "Bad request: the body or a field is invalid",
          "401": "Unauthorized: the server has an API key and the request did not carry it",
          "404": "Not found: an unknown model",
          "413": "The request body is too large",
          "500": "The engine failed on this request",
          "503": "The server is shutting down"}
GUARDED = ("/v1/", "/scope/lab")  # as `guard.PROTECTED`


def install(app: FastAPI) -> None:
    """Make `app.openapi()` return the corrected document (built once, on first use)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(error.pop("$defs"))  # ErrorDetail
            components["ErrorResponse"] = error
            for path, item in schema["paths"].items():
                for method, op in item.items():
                    codes = []
                    if op["responses"].pop("422", None) is not None or "requestBody" in op:
                        codes += ["400", "413"]
                    if path.startswith(GUARDED):
                        codes.append("401")
                    if path.startswith("/v1/") and method == "post":
                        codes += ["404", "500", "503"]
                    for code in codes:
                        op["responses"][code] = {"description": ERRORS[code], "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
