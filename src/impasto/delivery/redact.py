"""URLs as they may appear in logs: webhook tokens and presigned upload signatures ride in the
query string (and sometimes in userinfo), so a logged URL keeps only scheme, host, port and
path. Pure functions of the standard library, so that logging can use them too."""

from __future__ import annotations

import re
import traceback
import unicodedata
from urllib.parse import urlsplit, urlunsplit

# A URL inside free text: a scheme, "://", then everything up to whitespace or a quote.
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def _escape_controls(text: str) -> str:
    """Control characters as escapes, so a URL cannot end a log line and forge the next."""
    if not any(unicodedata.category(char) == "Cc" for char in text):
        return text
    return "".join(
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.category(char) == "Cc"
        else char
        for char in text
    )


def redact_url(url: str) -> str:
    """`scheme://host[:port]/path`, with `?…` for a query and `#…` for a fragment, and no
    userinfo; never raises."""
    # Escaped first: urlsplit would silently drop CR, LF and TAB, hiding what was sent.
    url = _escape_controls(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        # Unparseable (e.g. an unclosed "["): cut at the first "?" or "#" all the same.
        head = re.split(r"[?#]", url, maxsplit=1)[0]
        redacted = _USERINFO.sub(r"\1", head) + ("?…" if head != url else "")
        return redacted
    netloc = parts.netloc.rpartition("@")[2]
    redacted = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    if parts.query:
        redacted += "?…"
    if parts.fragment:
        redacted += "#…"
    return redacted


def redact_urls_in(text: str) -> str:
    """`text` with every URL in it redacted."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)


def describe_error(exc: BaseException) -> str:
    """An exception for the log: its type and its text, URLs redacted, at most 200 chars."""
    text = redact_urls_in(str(exc))[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def redacted_traceback(exc: BaseException) -> str:
    """The traceback for debugging, URLs redacted (exception texts often carry them)."""
    return redact_urls_in("".join(traceback.format_exception(exc)))
