"""The outbound-URL guard: which URLs impasto may fetch from or deliver to. Only literal
addresses and `localhost` are used, so vetting never leaves this machine."""

from __future__ import annotations

import asyncio

import pytest

from impasto.delivery.outbound import OutboundGuard, OutboundRefused, Target


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
    with pytest.raises(OutboundRefused, match="only http and https"):
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
    with pytest.raises(OutboundRefused, match="credentials"):
        vet(url)


@pytest.mark.parametrize("url", ["http://", "https:///path", "http://:80/"])
def test_urls_without_a_host_are_refused(url: str) -> None:
    with pytest.raises(OutboundRefused, match="no host"):
        vet(url)


def test_url_with_an_invalid_port_is_refused() -> None:
    with pytest.raises(OutboundRefused, match="invalid port"):
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
