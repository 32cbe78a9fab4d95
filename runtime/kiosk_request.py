"""One request of the kiosk's HTTP layer: its head (`Request`), its fields from a query string
or a JSON body (`Fields`, where z is validated), and its answer (`Answer`)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .checks import is_integer, is_number, parse_z
from .kiosk_app import ApiError

# 512 latent values of up to ~25 JSON characters each fit comfortably under both caps.
MAX_BODY_BYTES = 64 * 1024
MAX_QUERY_CHARS = 16 * 1024
INTEGER = re.compile(r"^[+-]?[0-9]{1,19}$")
JSON_TYPE = "application/json; charset=utf-8"


def latent_from_json(value, latent_dim: int) -> np.ndarray:
    """z from a JSON body: a list of latent_dim numbers, or a string parse_z accepts. Only
    what JSON can get wrong is checked here (types, count): the values are checked once, by
    the Runtime call that receives them."""
    if isinstance(value, str):
        return parse_z(value, latent_dim)
    if not isinstance(value, list):
        raise ValueError(
            f"z must be a list of {latent_dim} numbers or a string like '0.5,-1.2,...', "
            f"got {_json_kind(value)}"
        )
    for position, item in enumerate(value, start=1):
        if not is_number(item):
            raise ValueError(f"z value {position} is not a number: got {_json_kind(item)}")
    try:
        array = np.array([float(item) for item in value], dtype=np.float64)
    except OverflowError:
        raise ValueError("z holds a number too large for a float") from None
    if array.shape != (latent_dim,):
        raise ValueError(f"z has {array.shape[0]} values, expected {latent_dim} "
                         f"(the latent dimension)")
    return array


def parse_int(text, name: str) -> int:
    """An integer from a query string or JSON body (JSON floats such as 5.0 are refused)."""
    if is_integer(text):
        return text
    if isinstance(text, str) and INTEGER.match(text.strip()):
        return int(text)
    shown = repr(text[:40]) if isinstance(text, str) else _json_kind(text)
    raise ValueError(f"{name} must be an integer, got {shown}")


def json_int(value, name: str) -> int:
    """An integer from a JSON body: a JSON number, never a string of digits."""
    if isinstance(value, str):
        raise ValueError(f"{name} must be an integer, got a string")
    return parse_int(value, name)


def _json_kind(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false",
             type(None): "null", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class Answer:
    """One HTTP response, before it is written."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    cache: str = "no-store"
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False  # end the connection after this answer


def json_answer(payload: dict, status: int = 200, *, close: bool = False) -> Answer:
    return Answer(status, json.dumps(payload, separators=(",", ":")).encode("utf-8"), close=close)


def error_answer(status: int, message: str, *, close: bool = False) -> Answer:
    return json_answer({"error": message}, status, close=close)


@dataclass(frozen=True)
class Request:
    """What the router needs of one request; path and query are the raw, undecoded target."""

    method: str
    path: str
    route: str  # the path the route table is looked up by (path less any scheme and host)
    query: str
    http_version: str
    headers: dict[str, str]  # lower-case names; a repeated name keeps its first value
    repeated: frozenset[str]  # names given more than once
    client: str
    # The request line and headers as h11 parsed them (less the blanks it strips). h11 bounds
    # only a head still arriving; one that comes whole in a single read is checked with this.
    head_bytes: int = 0

    @classmethod
    def from_scope(cls, scope: dict) -> Request:
        headers, repeated = {}, set()
        head_bytes = (len(scope["method"]) + len(scope["raw_path"]) + len(scope["query_string"])
                      + len(" ? HTTP/1.1\r\n\r\n")
                      + sum(len(name) + len(value) + 4 for name, value in scope["headers"]))
        for name, value in scope["headers"]:
            key = name.decode("latin-1")
            if key in headers:
                repeated.add(key)
            else:
                headers[key] = value.decode("latin-1")
        client = scope.get("client")
        path = scope["raw_path"].decode("ascii", "replace")
        return cls(method=scope["method"], path=path, route=urlsplit(path).path,
                   query=scope["query_string"].decode("ascii", "replace"),
                   http_version=scope["http_version"], headers=headers,
                   repeated=frozenset(repeated), client=client[0] if client else "-",
                   head_bytes=head_bytes)

    @property
    def line(self) -> str:
        target = self.path + (f"?{self.query}" if self.query else "")
        return f"{self.method} {target[:200]} HTTP/{self.http_version}"


class Fields:
    """A request's fields: its query string's (text) or its JSON body's (JSON values)."""

    def __init__(self, values: dict, *, from_query: bool):
        self.values = values
        self.from_query = from_query

    @classmethod
    def from_query(cls, query: str) -> Fields:
        if len(query) > MAX_QUERY_CHARS:
            raise ApiError(HTTPStatus.REQUEST_URI_TOO_LONG,
                           f"query string is {len(query)} characters, at most "
                           f"{MAX_QUERY_CHARS} allowed")
        try:
            params = parse_qs(query, keep_blank_values=True, strict_parsing=False,
                              max_num_fields=16)
        except ValueError:
            raise ValueError("too many query parameters (at most 16)") from None
        repeated = sorted(name for name, values in params.items() if len(values) > 1)
        if repeated:
            raise ValueError(f"query parameter given more than once: {', '.join(repeated)}")
        return cls({name: values[0] for name, values in params.items()}, from_query=True)

    @classmethod
    def from_body(cls, raw: bytes) -> Fields:
        # The body is read as JSON whatever Content-Type says: `curl -d` sends a form type,
        # and cross-site posts are refused by origin before the body is read.
        try:
            payload = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError("request body is not UTF-8 text") from None
        except RecursionError:
            raise ValueError("request body is nested too deeply") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"request body is not valid JSON: {exc.msg} at "
                             f"line {exc.lineno} column {exc.colno}") from None
        if not isinstance(payload, dict):
            raise ValueError(f"request body must be a JSON object, got {_json_kind(payload)}")
        return cls(payload, from_query=False)

    def check(self, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
        unknown = sorted(set(self.values) - set(required) - set(optional))
        if unknown:
            allowed = ", ".join(required + optional) or "none"
            raise ValueError(f"unknown field(s): {', '.join(unknown)} (allowed: {allowed})")
        missing = [name for name in required if name not in self.values]
        if missing:
            raise ValueError(f"missing field: {missing[0]}")

    def z(self, latent_dim: int) -> np.ndarray:
        return latent_from_json(self.values["z"], latent_dim)

    def integer(self, name: str, default):
        if name not in self.values:
            return default
        value = self.values[name]
        return parse_int(value, name) if self.from_query else json_int(value, name)

    def get(self, name: str, default):
        return self.values.get(name, default)
