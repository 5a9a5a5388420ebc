"""aiohttp-apispec's decorators with types (the package has none), so ``mypy --strict`` can see through them."""
from __future__ import annotations

from typing import Any, Callable, TypeVar, cast

import aiohttp_apispec

F = TypeVar("F", bound=Callable[..., Any])


def docs(**kwargs: Any) -> Callable[[F], F]:
    """Describe an operation (summary, tags, responses...)."""
    return cast(Callable[[F], F], aiohttp_apispec.docs(**kwargs))


def request_schema(schema: Any, **kwargs: Any) -> Callable[[F], F]:
    """Document the JSON body.  Validation is the view's own (see ``api.views.read_json_object``)."""
    return cast(Callable[[F], F], aiohttp_apispec.request_schema(schema, **kwargs))


def querystring_schema(schema: Any, **kwargs: Any) -> Callable[[F], F]:
    """Document the query parameters."""
    return cast(Callable[[F], F], aiohttp_apispec.querystring_schema(schema, **kwargs))
