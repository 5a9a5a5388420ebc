"""Reading a request body: the media type, its codings, the JSON object; every failure a 4xx problem.

aiohttp leaves bodies as they came (see :class:`api.server.AppRunner`), so the limits here are the only ones:
the Content-Type grammar, the codings undone, and how far a compressed body may inflate.
"""
from __future__ import annotations

import json
import re
import zlib
from typing import Any

from aiohttp import web

from api.keys import SETTINGS
from api.problems import Problem

JSON_TYPES = ("application/json",)
MAX_CONTENT_TYPE = 100  # characters; "application/json; charset=utf-8" is 31
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(rf"[ \t]*{_TOKEN}/{_TOKEN}[ \t]*")
# name=value, the value a token or a quoted string (each character one way only), then the end or the next ";"
_PARAMETER = re.compile(rf'(?P<name>{_TOKEN})=(?P<value>{_TOKEN}|"(?:[\t !#-\[\]-~]|\\[\t -~])*")[ \t]*(?:;|$)')
_QUOTED_PAIR = re.compile(r"\\(.)")
BODY_ENCODINGS = ("identity", "gzip", "deflate")  # inflated by inflate() below, with zlib


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook: a key given twice makes the body ambiguous, so it is refused."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a 4xx problem saying what is wrong with it."""
    if not is_json_utf8(request.headers.get("Content-Type", "")):
        raise Problem(415, "Send the body as application/json (UTF-8).", code="unsupported_media_type")
    # Repeated lines mean the same as one comma-joined line (RFC 9110), and so does a list: refused below.
    encoding = ",".join(request.headers.getall("Content-Encoding", ["identity"])).strip(" \t").lower()
    if encoding not in BODY_ENCODINGS:
        raise Problem(415, f"Content-Encoding must be one of: {', '.join(BODY_ENCODINGS)}.",
                      code="unsupported_content_encoding")
    transfer = request.headers.get("Transfer-Encoding")
    if transfer is not None and transfer.strip(" \t").lower() != "chunked":
        raise Problem(501, "The only transfer coding understood is chunked.", code="unsupported_transfer_encoding")
    try:
        raw = await request.read()  # as sent (see api.server.AppRunner); aiohttp answers 413 past client_max_size
    except web.RequestPayloadError as exc:  # e.g. a chunked body with bad framing
        raise Problem(400, "The request body could not be read (check its framing).", code="invalid_body") from exc
    if encoding != "identity":
        raw = inflate(raw, encoding, limit=request.app[SETTINGS].api.max_body_bytes)
    if not raw.strip():
        raise Problem(400, "The request body is empty; send a JSON object.", code="empty_body")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Problem(400, "The request body is not valid UTF-8 JSON with unique keys.", code="invalid_json") from exc
    except RecursionError as exc:
        raise Problem(400, "The request body is nested too deeply.", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise Problem(422, "The request body must be a JSON object.", code="validation_error",
                      errors={"_schema": ["Expected a JSON object."]})
    return data


def is_json_utf8(content_type: str) -> bool:
    """True for ``application/json`` (RFC 9110 syntax), with no charset or a UTF-8 one.

    Parsed here, not through ``request.content_type``: aiohttp hands the header to the standard library's e-mail
    header parser, which raises on some short inputs (a 500) and takes a second of CPU on some long ones, with
    the event loop (and so every other request's deadline) stalled meanwhile.  One pass over at most
    ``MAX_CONTENT_TYPE`` characters, each pattern matched at a fixed place: nothing to backtrack into.
    """
    if len(content_type) > MAX_CONTENT_TYPE:
        return False
    media_type, _, rest = content_type.partition(";")
    if not _MEDIA_TYPE.fullmatch(media_type) or media_type.strip(" \t").lower() not in JSON_TYPES:
        return False
    while rest := rest.lstrip(" \t"):
        if rest.startswith(";"):  # an empty parameter ("application/json;" is seen in the wild)
            rest = rest[1:]
            continue
        param = _PARAMETER.match(rest)
        if param is None:
            return False
        value = param["value"]
        if value.startswith('"'):
            value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
        if param["name"].lower() == "charset" and value.lower() not in ("utf-8", "utf8"):
            return False
        rest = rest[param.end():]
    return True


def inflate(raw: bytes, encoding: str, *, limit: int) -> bytes:
    """Undo a gzip (one member or more, RFC 1952) or deflate (zlib or raw) body, to at most ``limit`` bytes: 413
    past it, 400 when the stream is broken, cut short or followed by anything else."""
    for wbits in ((zlib.MAX_WBITS | 16,) if encoding == "gzip" else (zlib.MAX_WBITS, -zlib.MAX_WBITS)):
        body, rest = b"", raw
        try:
            while True:
                inflater = zlib.decompressobj(wbits)
                body += inflater.decompress(rest, limit + 1 - len(body))  # never past the cap (and never 0: no cap)
                if len(body) > limit:
                    raise Problem(413, "Request body is too large.", code="payload_too_large")
                rest = inflater.unused_data
                if not inflater.eof or not rest or encoding != "gzip":
                    break
        except zlib.error:
            continue  # deflate: try the raw form next
        if inflater.eof and not rest:
            return body
        break
    raise Problem(400, f"The request body is not a complete {encoding} stream.", code="invalid_body")
