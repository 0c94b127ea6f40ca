"""Every outbound HTTP request (reference images, webhooks, upload endpoints) goes through here.

The guard resolves the host once, refuses private, loopback, link-local, metadata and other
non-global addresses (unless the operator allows private networks), and then connects to the
very address it vetted (TLS still verifies the original host name), so a DNS answer that
changes between check and connect cannot sneak a request into the internal network.
Redirects are followed by hand, each hop vetted the same way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

USER_AGENT = "impasto/0.1 (+https://github.com/impasto)"
MAX_REDIRECTS = 5


class OutboundRefused(ValueError):
    """The URL may not be fetched; the message says why, for the client."""


class OutboundFailed(ValueError):
    """The fetch was allowed but failed (connection, status, size, time)."""


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    address: str


def _address_allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class OutboundGuard:
    """Vets URLs: scheme, host, and every address the host resolves to."""

    def __init__(self, allow_private_networks: bool) -> None:
        self.allow_private_networks = allow_private_networks

    async def vet(self, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise OutboundRefused("only http and https URLs are accepted")
        host = parts.hostname
        if not host:
            raise OutboundRefused("URL has no host")
        if parts.username or parts.password:
            raise OutboundRefused("URLs with credentials are not accepted")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise OutboundRefused("URL has an invalid port") from None
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except (socket.gaierror, UnicodeError):
            raise OutboundFailed(f"host {host} could not be resolved") from None
        addresses = [str(info[4][0]) for info in infos]
        if not addresses:
            raise OutboundFailed(f"host {host} could not be resolved")
        if not self.allow_private_networks:
            for address in addresses:
                if not _address_allowed(ipaddress.ip_address(address.split("%")[0])):
                    raise OutboundRefused(
                        f"host {host} resolves to a private, loopback or link-local address; "
                        "such URLs are refused"
                    )
        return Target(url=url, host=host, address=addresses[0])


def _pinned(target: Target) -> tuple[str, dict[str, str], dict[str, str]]:
    """URL that connects to the vetted address, the Host header and the TLS name to use."""
    parts = urlsplit(target.url)
    address = f"[{target.address}]" if ":" in target.address else target.address
    netloc = address if parts.port is None else f"{address}:{parts.port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    host_header = parts.netloc.rsplit("@", 1)[-1]
    return pinned, {"Host": host_header}, {"sni_hostname": target.host}


class OutboundClient:
    """httpx for outbound calls, every hop vetted by the guard and pinned to its address."""

    def __init__(self, guard: OutboundGuard, client: httpx.AsyncClient) -> None:
        self.guard = guard
        self._client = client

    @classmethod
    def create(cls, guard: OutboundGuard) -> OutboundClient:
        client = httpx.AsyncClient(
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            timeout=httpx.Timeout(30.0, connect=10.0),
        )
        return cls(guard, client)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout | float | None = None,
        follow_redirects: bool = False,
    ) -> httpx.Response:
        """One request (redirects followed only if asked, each vetted); body fully read."""
        for _ in range(MAX_REDIRECTS + 1):
            target = await self.guard.vet(url)
            pinned, host_header, extensions = _pinned(target)
            response = await self._client.request(
                method,
                pinned,
                content=content,
                headers={**(headers or {}), **host_header},
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                extensions=extensions,
            )
            if not (follow_redirects and response.is_redirect):
                return response
            location = response.headers.get("location", "")
            url = urljoin(url, location)
            if response.status_code in (301, 302, 303) and method != "HEAD":
                method, content = "GET", None
        raise OutboundFailed(f"more than {MAX_REDIRECTS} redirects")

    async def fetch(self, url: str, *, max_bytes: int, timeout: float) -> tuple[bytes, str]:
        """GET a resource (following vetted redirects) with a size and a total time limit."""
        try:
            async with asyncio.timeout(timeout):
                return await self._fetch(url, max_bytes)
        except TimeoutError:
            raise OutboundFailed(f"download did not finish within {timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise OutboundFailed(f"download failed: {type(exc).__name__}") from None

    async def _fetch(self, url: str, max_bytes: int) -> tuple[bytes, str]:
        for _ in range(MAX_REDIRECTS + 1):
            target = await self.guard.vet(url)
            pinned, host_header, extensions = _pinned(target)
            request = self._client.build_request(
                "GET", pinned, headers=host_header, extensions=extensions
            )
            response = await self._client.send(request, stream=True)
            try:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise OutboundFailed(f"download answered HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > max_bytes:
                    raise OutboundFailed(f"resource is larger than {max_bytes} bytes")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body.extend(chunk)
                    if len(body) > max_bytes:
                        raise OutboundFailed(f"resource is larger than {max_bytes} bytes")
                return bytes(body), response.headers.get("content-type", "")
            finally:
                await response.aclose()
        raise OutboundFailed(f"more than {MAX_REDIRECTS} redirects")
