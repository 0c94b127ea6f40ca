"""Every outbound HTTP request (reference images, webhooks, upload endpoints) goes through here.

The guard checks the URL's syntax, resolves the host once, refuses private, loopback,
link-local, metadata and other non-global addresses (also when they hide inside an IPv6 form
such as NAT64, 6to4 or Teredo, unless the operator allows private networks), and then connects
to the very address it vetted (TLS still verifies the original host name), so a DNS answer that
changes between check and connect cannot sneak a request into the internal network.
Redirects are followed by hand, each hop vetted the same way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from impasto.delivery.urls import address_allowed
from impasto.protocol.urls import parse_url

USER_AGENT = "impasto/0.1 (+https://github.com/impasto)"
MAX_REDIRECTS = 5

# (ASCII host name, port) -> the addresses it resolves to.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class OutboundRefused(ValueError):
    """The URL may not be fetched; the message says why, for the client."""


class OutboundFailed(ValueError):
    """The fetch was allowed but failed (connection, status, size, time)."""


@dataclass(frozen=True)
class Target:
    """A vetted URL: `host` is its ASCII (IDNA) host name, `address` the address to connect to."""

    url: str
    host: str
    address: str
    # The port written in the URL (None: the scheme's default), for the Host header.
    port: int | None = None


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class OutboundGuard:
    """Vets URLs: syntax, scheme, host, and every address the host resolves to."""

    def __init__(self, allow_private_networks: bool, *, resolver: Resolver | None = None) -> None:
        self.allow_private_networks = allow_private_networks
        self._resolve = resolver or _getaddrinfo

    async def vet(self, url: str) -> Target:
        """The target to connect to; raises only OutboundRefused or OutboundFailed."""
        parsed = parse_url(url)
        if isinstance(parsed, str):
            raise OutboundRefused(parsed)
        host = parsed.host
        try:
            addresses = list(await self._resolve(host, parsed.effective_port))
        except (OSError, UnicodeError):
            raise OutboundFailed(f"host {host} could not be resolved") from None
        if not addresses:
            raise OutboundFailed(f"host {host} could not be resolved")
        if not self.allow_private_networks:
            for address in addresses:
                try:
                    allowed = address_allowed(ipaddress.ip_address(address.split("%")[0]))
                except ValueError:
                    allowed = False
                if not allowed:
                    raise OutboundRefused(
                        f"host {host} resolves to a private, loopback or link-local address; "
                        "such URLs are refused"
                    )
        return Target(url=url, host=host, address=addresses[0], port=parsed.port)


def _pinned(target: Target) -> tuple[str, dict[str, str], dict[str, str]]:
    """URL that connects to the vetted address, the Host header and the TLS name to use."""
    parts = urlsplit(target.url)
    address = f"[{target.address}]" if ":" in target.address else target.address
    netloc = address if target.port is None else f"{address}:{target.port}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    host = f"[{target.host}]" if ":" in target.host else target.host
    host_header = host if target.port is None else f"{host}:{target.port}"
    return pinned, {"Host": host_header}, {"sni_hostname": target.host}


# --- Connection pools -----------------------------------------------------------------------


@dataclass
class _Pool:
    transport: httpx.AsyncBaseTransport
    users: int = 0
    evicted: bool = False


class _ReleasingStream(httpx.AsyncByteStream):
    """A response body that hands its pool back when it is closed."""

    def __init__(
        self, stream: httpx.AsyncByteStream, release: Callable[[], Awaitable[None]]
    ) -> None:
        self._stream = stream
        self._release: Callable[[], Awaitable[None]] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        release, self._release = self._release, None
        try:
            await self._stream.aclose()
        finally:
            if release is not None:
                await release()


class HostPoolTransport(httpx.AsyncBaseTransport):
    """One connection pool per (scheme, Host, address, port).

    Pinned requests all name the vetted IP, and httpx pools connections by URL origin: with
    one pool a request for host B could ride a keep-alive TLS connection that was verified
    for host A on the same address. Keying the pool on the host name as well prevents that.
    The least recently used pools beyond `max_pools` are closed once no response uses them.
    """

    def __init__(
        self,
        factory: Callable[[], httpx.AsyncBaseTransport] = httpx.AsyncHTTPTransport,
        max_pools: int = 32,
    ) -> None:
        self._factory = factory
        self._max_pools = max_pools
        self._pools: OrderedDict[tuple[str, str, str, int | None], _Pool] = OrderedDict()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        key = (
            request.url.scheme,
            request.headers.get("host", "").lower(),
            request.url.host,
            request.url.port,
        )
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(self._factory())
        self._pools.move_to_end(key)
        pool.users += 1
        try:
            await self._evict()
            response = await pool.transport.handle_async_request(request)
        except BaseException:
            await self._release(pool)
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _ReleasingStream(response.stream, lambda: self._release(pool))
        return response

    async def _evict(self) -> None:
        while len(self._pools) > self._max_pools:
            _, pool = self._pools.popitem(last=False)
            pool.evicted = True
            if pool.users == 0:
                await pool.transport.aclose()

    async def _release(self, pool: _Pool) -> None:
        pool.users -= 1
        if pool.evicted and pool.users == 0:
            await pool.transport.aclose()

    async def aclose(self) -> None:
        pools = list(self._pools.values())
        self._pools.clear()
        for pool in pools:
            pool.evicted = True
            await pool.transport.aclose()


class OutboundClient:
    """httpx for outbound calls, every hop vetted by the guard and pinned to its address."""

    def __init__(self, guard: OutboundGuard, client: httpx.AsyncClient) -> None:
        self.guard = guard
        self._client = client

    @classmethod
    def create(
        cls,
        guard: OutboundGuard,
        *,
        transport_factory: Callable[[], httpx.AsyncBaseTransport] = httpx.AsyncHTTPTransport,
    ) -> OutboundClient:
        """A client whose connection pools are kept apart per host name (see HostPoolTransport);
        `transport_factory` makes each pool's transport."""
        client = httpx.AsyncClient(
            transport=HostPoolTransport(transport_factory),
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
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
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
