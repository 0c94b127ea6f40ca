"""The syntax of the URLs a client gives us (webhookURL, uploadEndpoint, reference and upload
images): checked when the task is parsed, so that a URL httpx cannot even build is a 400 naming
the parameter, not a failed delivery or a 500 later; and parsed the same way by the outbound
guard (delivery/), which then decides which addresses the host may reach. Nothing here resolves
a name.

A host name goes to DNS, the Host header and TLS in its IDNA (ASCII) form.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import urlsplit

import idna

HTTP_SCHEMES = ("http", "https")
# Longer than any signed upload URL we know of; image strings that are not URLs may be longer.
MAX_URL_LENGTH = 8192

# A DNS label, lower case (`_` is common in internal names).
_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
# httpx reads a host of four dotted numbers as IPv4 and refuses it unless it is one.
_IPV4_STYLE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")
# Unicode categories refused anywhere in a URL: control (CR/LF would forge log lines and
# headers), format (invisible bidi overrides) and lone surrogates (not encodable at all).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})


@dataclass(frozen=True)
class ParsedURL:
    """The parts of a URL that the outbound guard needs; `host` is ASCII (IDNA) or an IP."""

    scheme: str
    host: str
    port: int | None

    @property
    def effective_port(self) -> int:
        return self.port or (443 if self.scheme == "https" else 80)


def looks_like_http_url(value: str) -> bool:
    """Whether an image string is meant as an http(s) URL (not a UUID, data URI or base64)."""
    return value[:8].lower() == "https://" or value[:7].lower() == "http://"


def url_problem(value: str) -> str | None:
    """None when `value` is a well-formed http(s) URL we could send a request to, else why not."""
    parsed = parse_url(value)
    return parsed if isinstance(parsed, str) else None


def parse_url(value: str) -> ParsedURL | str:
    """The URL's parts, or why it cannot be used (a message for the client)."""
    if len(value) > MAX_URL_LENGTH:
        return f"a URL is at most {MAX_URL_LENGTH} characters"
    for char in value:
        if char.isspace() or unicodedata.category(char) in _REFUSED_CATEGORIES:
            return "a URL may not contain whitespace or control characters"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        # urlsplit refuses unbalanced brackets (`http://[::1`, `http://]/`); .port refuses
        # a port that is not a number from 0 to 65535.
        return "not a parseable URL (check brackets and port)"
    if parts.scheme not in HTTP_SCHEMES:
        return "the URL scheme must be http or https"
    if "@" in parts.netloc:
        return "a URL may not carry a user name or password"
    if port == 0:
        return "the URL port must be between 1 and 65535"
    try:
        host = _wire_host(parts.netloc, parts.hostname)
    except _BadHost as exc:
        return str(exc)
    return ParsedURL(parts.scheme, host, port)


class _BadHost(ValueError):
    """Why a URL's host is not one."""


def _wire_host(netloc: str, hostname: str | None) -> str:
    """The host as it goes on the wire; raises _BadHost."""
    if not hostname:
        raise _BadHost("the URL needs a host")
    if netloc.startswith("["):
        literal, _, rest = netloc[1:].partition("]")
        # A zone id names an interface of this machine, never a host a client may point at.
        if "%" in literal or (rest and not rest.startswith(":")):
            raise _BadHost("the URL host is not a valid IPv6 address")
        try:
            return str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise _BadHost("the URL host is not a valid IPv6 address") from None
    if _IPV4_STYLE.fullmatch(hostname):
        try:
            return str(ipaddress.IPv4Address(hostname))
        except ValueError:
            raise _BadHost("the URL host is not a valid IPv4 address") from None
    host = hostname
    if not host.isascii():
        try:
            # UTS 46 maps what browsers map (full-width dots, case) before IDNA 2008.
            host = idna.encode(host, uts46=True).decode("ascii")
        except (UnicodeError, ValueError):  # idna.IDNAError is a UnicodeError
            raise _BadHost("the URL host is not a valid internationalised domain name") from None
    name = host.lower().removesuffix(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise _BadHost("the URL host is not a valid host name")
    return name
