"""The ingress API's shapes (``hypeman.types.Ingress`` in the official SDK), which are also what
``ingresses/<id>.json`` holds. Each model checks what can be checked without looking at other
ingresses or instances (the service checks the rest)."""

from __future__ import annotations

import re
import secrets
import time
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hypemand.ingress.hostnames import parse_hostname, parse_target
from hypemand.instances.models import NAME_PATTERN, validate_name
from hypemand.tags import check_tags
from hypemand.wire import WireModel

MAX_RULES = 100
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")  # an RFC 9110 token
# Header names a rule may not require, lowercase. Each is one Caddy or the client handles
# itself, so a check on it is meaningless, spoofable, or breaks the request:
RESERVED_HEADERS = frozenset({
    # host and framing: Caddy routes on Host and parses the message by these
    "host", "content-length", "transfer-encoding", "te", "trailer", "expect",
    # hop-by-hop (RFC 9110 7.6.1): removed by every proxy on the way, never reach the VM
    "connection", "keep-alive", "upgrade", "proxy-connection",
    # authentication: belong to the application and to real auth schemes, not to a shared secret
    "authorization", "proxy-authorization", "www-authenticate", "proxy-authenticate",
    # cookies: a browser sends them on its own to anyone, and they are the application's
    "cookie", "set-cookie",
    # proxy headers: Caddy writes them for the upstream; a client's own are not to be trusted
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip", "via",
})
MIN_AUTH_VALUE, MAX_AUTH_VALUE = 32, 256
_AUTH_VALUE = re.compile(r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")  # printable ASCII, no edge space
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_KSUID_EPOCH = 1_400_000_000


def new_ingress_id() -> str:
    """A KSUID-like id, as the reference's: 27 base-62 characters of a 4-byte timestamp and 16
    random bytes, so ids sort by creation time."""
    raw = int(time.time() - _KSUID_EPOCH).to_bytes(4, "big") + secrets.token_bytes(16)
    number, digits = int.from_bytes(raw, "big"), []
    while number:
        number, digit = divmod(number, 62)
        digits.append(_BASE62[digit])
    return "".join(reversed(digits)).rjust(27, "0")


class IngressMatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hostname: str
    port: int = Field(default=80, ge=1, le=65535)

    @field_validator("hostname")
    @classmethod
    def _hostname_ok(cls, value: str) -> str:
        return parse_hostname(value).text


class IngressTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instance: str
    port: int = Field(ge=1, le=65535)


class RequestHeaderAuth(BaseModel):
    """A header every request must carry with exactly this value; others get 401 from Caddy."""

    model_config = ConfigDict(extra="forbid")

    header: str
    value: str

    @field_validator("header")
    @classmethod
    def _header_ok(cls, value: str) -> str:
        if not HEADER_NAME.fullmatch(value):
            raise ValueError(f"{value[:64]!r} is not an HTTP header name")
        if value.lower() in RESERVED_HEADERS:
            raise ValueError(f"{value} is reserved (host, framing, hop-by-hop, authentication, cookie "
                             "and proxy headers are handled by the proxy or the client)")
        return value

    @field_validator("value")
    @classmethod
    def _value_ok(cls, value: str) -> str:
        if not MIN_AUTH_VALUE <= len(value) <= MAX_AUTH_VALUE:
            raise ValueError(f"must be {MIN_AUTH_VALUE}-{MAX_AUTH_VALUE} characters, not {len(value)}")
        if not _AUTH_VALUE.fullmatch(value):
            raise ValueError("must be printable ASCII, without spaces at either end")
        return value


class IngressRule(WireModel):
    model_config = ConfigDict(extra="forbid")

    match: IngressMatch
    target: IngressTarget
    tls: bool = False
    redirect_http: bool = False  # HTTP (port 80) -> HTTPS for this hostname; only with tls
    request_header_auth: RequestHeaderAuth | None = None

    @model_validator(mode="after")
    def _target_ok(self) -> IngressRule:
        hostname = parse_hostname(self.match.hostname)
        self.target.instance = parse_target(self.target.instance, hostname)
        if self.tls:
            hostname.certificate_name()  # a pattern must be able to have a wildcard certificate
            if self.redirect_http and self.match.port == 80:
                raise ValueError("redirect_http sends port 80 to HTTPS, so the tls port cannot be 80")
        return self

    @property
    def redirects(self) -> bool:
        return self.tls and self.redirect_http


def _rules_ok(rules: list[IngressRule]) -> list[IngressRule]:
    if not rules:
        raise ValueError("at least one rule is needed")
    if len(rules) > MAX_RULES:
        raise ValueError(f"at most {MAX_RULES} rules")
    return rules


class CreateIngressRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    rules: list[IngressRule]
    tags: dict[str, str] | None = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):  # validate_name's "$" lets a final newline through
            raise ValueError("must be lowercase letters, digits and '-', starting and ending with a "
                             "letter or digit")
        return validate_name(value)

    @field_validator("rules")
    @classmethod
    def _rules_ok(cls, value: list[IngressRule]) -> list[IngressRule]:
        return _rules_ok(value)

    @field_validator("tags")
    @classmethod
    def _tags_ok(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_tags(value)


class Ingress(WireModel):
    """``GET /ingresses/{id}``, and the stored ``ingresses/<id>.json``."""

    id: str
    name: str
    rules: list[IngressRule]
    tags: dict[str, str] | None = None
    created_at: datetime
