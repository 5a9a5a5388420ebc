"""aiohttp-apispec's decorators with types (the package has none), so ``mypy --strict`` can see through them."""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, TypeVar, cast

import aiohttp_apispec
from aiohttp import web

F = TypeVar("F", bound=Callable[..., Any])


def docs(**kwargs: Any) -> Callable[[F], F]:
    """Describe an operation (summary, tags, responses...)."""
    return cast(Callable[[F], F], aiohttp_apispec.docs(**kwargs))


def request_schema(schema: Any, **kwargs: Any) -> Callable[[F], F]:
    """Document the JSON body.  Validation is the view's own (see ``api.bodies.read_json_object``)."""
    return cast(Callable[[F], F], aiohttp_apispec.request_schema(schema, **kwargs))


def querystring_schema(schema: Any, **kwargs: Any) -> Callable[[F], F]:
    """Document the query parameters."""
    return cast(Callable[[F], F], aiohttp_apispec.querystring_schema(schema, **kwargs))


def reset_view_docs(views: Iterable[type[web.View]]) -> None:
    """Give every documented view method a fresh copy of what its decorators recorded.

    aiohttp-apispec 2.2.3 consumes that record while it builds a document (it pops the schemas and appends to
    the parameters), so a second application in one process (every test builds one) would get a broken
    document.  The first call keeps a pristine copy; each call hands out a new deep copy of it.
    """
    for view in views:
        for name in ("get", "post", "put", "patch", "delete"):
            method = getattr(view, name, None)
            if method is None or not hasattr(method, "__apispec__"):
                continue
            if not hasattr(method, "__apispec_pristine__"):
                method.__apispec_pristine__ = copy.deepcopy(method.__apispec__)
            method.__apispec__ = copy.deepcopy(method.__apispec_pristine__)


def finish_document(spec: dict[str, Any], providers: list[str], schemes: tuple[str, ...]) -> None:
    """Complete what aiohttp-apispec leaves out of the Swagger 2.0 document, in place.

    Security schemes (so "Try it out" can authenticate), the problem media type on every operation, the body
    as required, and the input rules marshmallow enforces but apispec 3 does not describe: unknown fields
    refused, text length and alphabet, the configured provider names.
    """
    spec["info"]["description"] = ("SMS gateway. Every error is an RFC 9457 problem (application/problem+json) "
                                   "with a stable `code`; every request is answered within 1 s.")
    definitions = {
        "smsauth": ("SMSAUTH", {"type": "apiKey", "in": "header", "name": "Authorization",
                                "description": "`SMSAUTH:<username>`, username 1-64 of A-Z a-z 0-9 . _ @ + -"}),
        "jwt": ("Bearer", {"type": "apiKey", "in": "header", "name": "Authorization",
                           "description": "`Bearer <JWT>` signed by the SSO (type the word Bearer too)"}),
    }
    spec["securityDefinitions"] = dict(definitions[scheme] for scheme in schemes)
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            operation["produces"] = (["text/plain", "application/problem+json"] if path == "/metrics"
                                     else ["application/json", "application/problem+json"])
            if path.startswith("/api/v1/"):
                operation["security"] = [{name: []} for name in spec["securityDefinitions"]]
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "query":
                    parameter["allowEmptyValue"] = True  # "?limit=" counts as absent, as forms send it
                if parameter["in"] == "body":
                    parameter["required"] = True
                    operation["consumes"] = ["application/json"]
    listing = {p["name"]: p for p in spec["paths"]["/api/v1/messages"]["get"]["parameters"]}
    listing["phone"].update(maxLength=32, pattern=r"^(\s*\+[0-9 ().\-]+\s*)?$")
    listing["cursor"].update(maxLength=200, pattern=r"^[A-Za-z0-9_\-]*$")
    for operation in spec["paths"]["/api/v1/messages"].values():
        for parameter in operation["parameters"]:
            if parameter["name"] == "Idempotency-Key":
                parameter["pattern"] = r"^[ -~]{1,255}$"
    create = spec["definitions"]["MessageCreate"]
    create["additionalProperties"] = False
    create["properties"]["text"].update(minLength=1, maxLength=140, pattern=r"^[\t\n\r -~]{1,140}$")
    create["properties"]["phone"].update(minLength=2, maxLength=32, pattern=r"^\s*\+[0-9 ().\-]+\s*$")
    create["properties"]["provider"]["enum"] = [*providers, None]
