"""The outbound-URL guard: which URLs impasto may fetch from or deliver to. Only literal
addresses, `localhost` and injected resolvers are used, so vetting never leaves this machine."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Iterable

import httpcore
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from impasto.delivery.outbound import (
    OutboundClient,
    OutboundGuard,
    OutboundRefused,
    Target,
    _pinned,
)
from impasto.protocol.urls import url_problem


def vet(url: str, allow_private_networks: bool = False) -> Target:
    return asyncio.run(OutboundGuard(allow_private_networks=allow_private_networks).vet(url))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/image.png",
        "http://127.0.0.1:8000/image.png",
        "http://[::1]/",
        "http://[::1]:8080/x",
        "http://[::ffff:127.0.0.1]/",
        "http://10.0.0.1/",
        "http://192.168.1.1/",
        "http://172.16.0.1/",
        "http://172.31.255.254/",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://[::]/",
        "http://[fd00::1]/",
        "http://[fe80::1]/",
        "http://224.0.0.1/",
        "http://255.255.255.255/",
        "http://192.0.2.1/",
        "http://198.18.0.1/",
        "http://localhost/",
        "http://localhost:9000/hook",
        "https://localhost/",
    ],
)
def test_private_loopback_link_local_and_reserved_addresses_are_refused(url: str) -> None:
    with pytest.raises(OutboundRefused, match="private, loopback or link-local"):
        vet(url)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://8.8.8.8/file.png",
        "file:///etc/passwd",
        "gopher://8.8.8.8/",
        "data:image/png;base64,AAAA",
        "javascript:alert(1)",
        "8.8.8.8/image.png",
    ],
)
def test_schemes_other_than_http_and_https_are_refused(url: str) -> None:
    with pytest.raises(OutboundRefused, match="scheme must be http or https"):
        vet(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pass@8.8.8.8/",
        "https://user@8.8.8.8/",
        "http://:secret@8.8.8.8/",
    ],
)
def test_urls_with_credentials_are_refused(url: str) -> None:
    with pytest.raises(OutboundRefused, match="user name or password"):
        vet(url)


@pytest.mark.parametrize("url", ["http://", "https:///path", "http://:80/"])
def test_urls_without_a_host_are_refused(url: str) -> None:
    with pytest.raises(OutboundRefused, match="needs a host"):
        vet(url)


def test_url_with_an_invalid_port_is_refused() -> None:
    with pytest.raises(OutboundRefused, match="port"):
        vet("http://8.8.8.8:99999/")


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://8.8.8.8/image.png", "8.8.8.8"),
        ("https://1.1.1.1:8443/x?y=1", "1.1.1.1"),
        ("http://[2001:4860:4860::8888]/", "2001:4860:4860::8888"),
        ("http://[::ffff:8.8.8.8]/", "::ffff:8.8.8.8"),
    ],
)
def test_global_literal_address_is_accepted_and_pinned(url: str, address: str) -> None:
    target = vet(url)
    assert target.url == url
    assert target.address == address


def test_target_keeps_the_host_name_for_tls() -> None:
    target = vet("https://8.8.4.4/image.png")
    assert target.host == "8.8.4.4"


@pytest.mark.parametrize(
    ("url", "addresses"),
    [
        ("http://127.0.0.1:8000/ref.png", {"127.0.0.1"}),
        ("http://[::1]/", {"::1"}),
        ("http://10.0.0.1/", {"10.0.0.1"}),
        ("http://localhost/", {"127.0.0.1", "::1"}),
    ],
)
def test_private_addresses_are_accepted_when_the_operator_allows_private_networks(
    url: str, addresses: set[str]
) -> None:
    target = vet(url, allow_private_networks=True)
    assert target.address in addresses


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/", "http://user:pass@127.0.0.1/"])
def test_allowing_private_networks_still_refuses_bad_schemes_and_credentials(url: str) -> None:
    with pytest.raises(OutboundRefused):
        vet(url, allow_private_networks=True)


# --- Malformed URLs and control characters ----------------------------------------------------

MALFORMED = [
    "http://[::1",
    "http://]/",
    "http://a:99999/",
    "http://a:0/",
    "http://a:b/",
    "http://[::1]:80:80/",
    "http://[x]/",
    "http://[v1.x]/",
    "http://[::1]x/",
    "http://[fe80::1%25eth0]/",
    "http://\uff03/",
    "http://a..b/",
    "http://%zz/",
    "http://a\\b/",
    "http://" + "a" * 64 + ".example/",
    "http://8.8.8.8/" + "a" * 70000,
]


@pytest.mark.parametrize("url", MALFORMED)
def test_malformed_urls_are_refused_not_raised_as_bare_value_errors(url: str) -> None:
    with pytest.raises(OutboundRefused):
        vet(url)
    assert url_problem(url) is not None


@pytest.mark.parametrize(
    "url",
    [
        "http://8.8.8.8/a\r\nX-Injected: 1",
        "http://8.8.8.8/\nb",
        "\thttp://8.8.8.8/",
        "http://8.8.\t8.8/",
        "http://8.8.8.8/a b",
        " http://8.8.8.8/",
        "http://8.8.8.8/\x00",
        "http://8.8.8.8/\x1b[31m",
        "http://8.8.8.8/\x7f",
        "http://8.8.8.8/\u0085",
        "http://8.8.8.8/\u3000",
    ],
)
def test_urls_with_whitespace_or_control_characters_are_refused(url: str) -> None:
    with pytest.raises(OutboundRefused, match="whitespace or control characters"):
        vet(url, allow_private_networks=True)
    assert url_problem(url) == "a URL may not contain whitespace or control characters"


@pytest.mark.parametrize(
    "url",
    [
        "http://8.8.8.8/",
        "https://example.com:8443/a/b?c=d#e",
        "http://[2001:db8::1]:80/",
        "http://bücher.example/",
        "http://under_score.example./x",
        "HTTP://EXAMPLE.COM/",
    ],
)
def test_well_formed_urls_pass_the_syntax_check(url: str) -> None:
    assert url_problem(url) is None


async def _resolve_to_public(host: str, port: int) -> list[str]:
    return ["8.8.8.8"]


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.one_of(st.text(), st.text().map(lambda tail: "http://" + tail)))
def test_vet_raises_only_outbound_errors_for_any_string(url: str) -> None:
    guard = OutboundGuard(allow_private_networks=False, resolver=_resolve_to_public)
    problem = url_problem(url)
    if problem is None:
        asyncio.run(guard.vet(url))
    else:
        with pytest.raises(OutboundRefused) as refused:
            asyncio.run(guard.vet(url))
        assert str(refused.value) == problem


# --- IPv6 forms that embed a private IPv4 address -----------------------------------------------


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("64:ff9b:1:a00:1::", False),  # local-use NAT64 /48 of 10.0.0.1
        ("64:ff9b:1::a00:1", False),  # local-use NAT64 /96 of 10.0.0.1
        ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("2002:c0a8:101::1", False),  # 6to4 of 192.168.1.1
        ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
        ("::a00:1", False),  # IPv4-compatible 10.0.0.1
        ("::7f00:1", False),  # IPv4-compatible 127.0.0.1
        ("::ffff:0:a00:1", False),  # IPv4-translated 10.0.0.1
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False),  # Teredo, client 10.0.0.1
        ("2001:0:808:808:8000:63bf:80ff:fffe", False),  # Teredo, client 127.0.0.1
        ("fec0::1", False),  # site-local
        ("fec0:1234::5", False),
        ("feff::1", False),
        ("ff0e::1", False),  # global-scope multicast
        ("::ffff:a00:1", False),  # IPv4-mapped 10.0.0.1
        ("::ffff:808:808", True),  # IPv4-mapped 8.8.8.8
        ("2001:4860:4860::8888", True),
        ("2606:4700:4700::1111", True),
    ],
)
def test_ipv6_forms_are_judged_by_the_ipv4_address_they_embed(address: str, allowed: bool) -> None:
    url = f"http://[{address}]/"
    if allowed:
        assert ipaddress.ip_address(vet(url).address) == ipaddress.ip_address(address)
    else:
        with pytest.raises(OutboundRefused, match="private, loopback or link-local"):
            vet(url)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("64:ff9b::a00:1", False),
        ("2002:a00:1::1", False),
        ("fec0::1", False),
        ("::ffff:127.0.0.1", False),
        ("10.0.0.1", False),
        ("8.8.8.8", True),
        ("2002:808:808::1", True),
    ],
)
def test_resolved_addresses_follow_the_same_rule(address: str, allowed: bool) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return ["8.8.4.4", address]

    guard = OutboundGuard(allow_private_networks=False, resolver=resolve)
    if allowed:
        assert asyncio.run(guard.vet("https://images.example/x.png")).address == "8.8.4.4"
    else:
        with pytest.raises(OutboundRefused):
            asyncio.run(guard.vet("https://images.example/x.png"))


# --- Internationalized host names ---------------------------------------------------------------


def test_idn_host_goes_to_dns_host_header_and_sni_in_idna_form() -> None:
    asked: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["8.8.8.8"]

    guard = OutboundGuard(allow_private_networks=False, resolver=resolve)
    target = asyncio.run(guard.vet("https://Bücher.example:8443/Straße?q=ü"))
    assert asked == [("xn--bcher-kva.example", 8443)]
    assert target.host == "xn--bcher-kva.example"
    pinned, headers, extensions = _pinned(target)
    assert pinned.startswith("https://8.8.8.8:8443/")
    assert headers == {"Host": "xn--bcher-kva.example:8443"}
    assert extensions == {"sni_hostname": "xn--bcher-kva.example"}


async def _no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"{host} should not have been resolved")


@pytest.mark.parametrize(
    "url", ["http://☃.example/", "http://\u0301a.example/", "http://" + "ü" * 70 + ".example/"]
)
def test_host_names_that_cannot_be_idna_encoded_are_refused(url: str) -> None:
    guard = OutboundGuard(allow_private_networks=True, resolver=_no_dns)
    with pytest.raises(OutboundRefused, match="not a valid"):
        asyncio.run(guard.vet(url))


def test_request_to_an_idn_host_sends_an_ascii_host_header() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    async def main() -> int:
        guard = OutboundGuard(allow_private_networks=True, resolver=resolve)
        client = OutboundClient(guard, httpx.AsyncClient(transport=httpx.MockTransport(handler)))
        try:
            response = await client.request("POST", "http://bücher.example/hook", content=b"{}")
        finally:
            await client.aclose()
        return response.status_code

    assert asyncio.run(main()) == 204
    assert seen[0].headers["host"] == "xn--bcher-kva.example"
    assert seen[0].url.host == "127.0.0.1"


# --- TLS connections are never shared between host names -------------------------------------

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RecordingStream(httpcore.AsyncMockStream):
    def __init__(self, backend: RecordingBackend) -> None:
        super().__init__([RESPONSE] * 8)
        self._backend = backend

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self._backend.tls_names.append(server_hostname)
        return self

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._backend.writes.append((id(self), buffer))


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """Connections as the pool opens them: where to, and for which TLS name."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []
        self.tls_names: list[str | None] = []
        self.writes: list[tuple[int, bytes]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append((host, port))
        return RecordingStream(self)

    async def sleep(self, seconds: float) -> None:
        pass


def test_https_connections_are_not_reused_across_host_names_on_one_address() -> None:
    backend = RecordingBackend()

    def transport() -> httpx.AsyncHTTPTransport:
        made = httpx.AsyncHTTPTransport()
        # The real httpcore pool, over sockets that record what the pool asks of them.
        made._pool = httpcore.AsyncConnectionPool(network_backend=backend)
        return made

    async def resolve(host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    async def main() -> None:
        guard = OutboundGuard(allow_private_networks=True, resolver=resolve)
        client = OutboundClient.create(guard, transport_factory=transport)
        try:
            for url in ("https://a.example/1", "https://b.example/2", "https://a.example/3"):
                assert (await client.request("GET", url)).status_code == 200
        finally:
            await client.aclose()

    asyncio.run(main())
    assert backend.connects == [("127.0.0.1", 443), ("127.0.0.1", 443)]
    assert backend.tls_names == ["a.example", "b.example"]
    by_connection: dict[int, list[bytes]] = {}
    for connection, data in backend.writes:
        by_connection.setdefault(connection, []).append(data)
    hosts = [
        sorted(
            {line for data in writes for line in data.split(b"\r\n") if line.startswith(b"Host")}
        )
        for writes in by_connection.values()
    ]
    assert hosts == [[b"Host: a.example"], [b"Host: b.example"]]
