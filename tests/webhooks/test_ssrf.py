"""SSRF protection for webhook URLs: refused at registration, refused again at connect time
(DNS rebinding), unless the address is inside MEMBERHUB_WEBHOOK_ALLOWED_NETWORKS."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import httpcore
import httpx
import pytest

from memberhub.settings import Settings
from memberhub.webhooks.ssrf import (
    DestinationRefused,
    GuardedNetworkBackend,
    UrlPolicy,
    WebhookUrlRefused,
    allowed_addresses,
    check_host,
    check_url,
    guarded_transport,
    parse_networks,
    refusal_reason,
)

PUBLIC_V4 = "93.184.215.14"
PUBLIC_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"
SETTING = "MEMBERHUB_WEBHOOK_ALLOWED_NETWORKS"

HTTPS_ONLY = UrlPolicy(allow_http=False, allowed_networks=())
HTTP_ALLOWED = UrlPolicy(allow_http=True, allowed_networks=())
LOOPBACK_ALLOWED = UrlPolicy(allow_http=True, allowed_networks=parse_networks("127.0.0.0/8"))


@dataclass
class FakeDns:
    """A resolver answering from a table; a host in `rebind_to` answers differently from its
    second lookup on, as a rebinding attacker's name server would."""

    answers: dict[str, list[str]] = field(default_factory=dict)
    rebind_to: dict[str, list[str]] = field(default_factory=dict)
    calls: list[tuple[str, int]] = field(default_factory=list)

    async def __call__(self, host: str, port: int) -> list[str]:
        looked_up_before = any(called == host for called, _ in self.calls)
        self.calls.append((host, port))
        if looked_up_before and host in self.rebind_to:
            return self.rebind_to[host]
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.answers[host]


async def refused(
    url: str, policy: UrlPolicy = HTTPS_ONLY, dns: FakeDns | None = None
) -> WebhookUrlRefused:
    with pytest.raises(WebhookUrlRefused) as caught:
        await check_url(url, policy, resolver=dns or FakeDns())
    assert caught.value.code == "WEBHOOK_URL_REFUSED"
    assert caught.value.status_code == 422
    return caught.value


# ---------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("url", "address", "reason"),
    [
        ("https://10.0.0.1/", "10.0.0.1", "private"),
        ("https://192.168.1.20/", "192.168.1.20", "private"),
        ("https://169.254.169.254/latest/meta-data/", "169.254.169.254", "link-local"),
        ("https://127.0.0.1/", "127.0.0.1", "loopback"),
        ("https://[::1]/", "::1", "loopback"),
        ("https://0.0.0.0/", "0.0.0.0", "unspecified"),
        ("https://[::]/", "::", "unspecified"),
        ("https://100.64.0.1/", "100.64.0.1", "carrier-grade NAT"),
        ("https://224.0.0.1/", "224.0.0.1", "multicast"),
        ("https://[ff02::1]/", "ff02::1", "multicast"),
        ("https://240.0.0.1/", "240.0.0.1", "reserved"),
        ("https://192.0.2.1/", "192.0.2.1", "not globally routable"),
        ("https://192.0.0.8/", "192.0.0.8", "not globally routable"),
        ("https://192.0.0.170/", "192.0.0.170", "not globally routable"),
        ("https://[fe80::1]/", "fe80::1", "link-local"),
        ("https://[fc00::1]/", "fc00::1", "private"),
        ("https://[fec0::1]/", "fec0::1", "site-local"),
        ("https://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1", "loopback"),
        ("https://[::ffff:10.0.0.1]:8443/", "::ffff:10.0.0.1", "private"),
        ("https://[64:ff9b::a00:1]/", "64:ff9b::a00:1", "private IPv4 via NAT64"),
        ("https://[64:ff9b::7f00:1]/", "64:ff9b::7f00:1", "loopback IPv4 via NAT64"),
        ("https://[2002:7f00:1::1]/", "2002:7f00:1::1", "loopback IPv4 via 6to4"),
        ("https://[2002:a9fe:a9fe::1]/", "2002:a9fe:a9fe::1", "link-local IPv4 via 6to4"),
    ],
)
async def test_an_ip_literal_that_is_not_globally_routable_is_refused(
    url: str, address: str, reason: str
) -> None:
    dns = FakeDns()

    error = await refused(url, dns=dns)

    assert error.details == {"field": "url", "reason": reason, "address": address}
    assert f"points at {address} ({reason}), which webhooks may not reach" in error.message
    assert SETTING in error.message
    assert dns.calls == []  # a literal is judged as written, never resolved


@pytest.mark.parametrize(
    "address",
    [
        PUBLIC_V4,
        PUBLIC_V6,
        f"::ffff:{PUBLIC_V4}",
        "64:ff9b::5db8:d70e",  # NAT64 of 93.184.215.14
        "192.0.0.9",  # the two global anycast services among the protocol assignments
        "192.0.0.10",
    ],
)
def test_a_globally_routable_address_has_no_refusal_reason(address: str) -> None:
    assert refusal_reason(ipaddress.ip_address(address), ()) is None


@pytest.mark.parametrize("url", ["https://1.1.1.1:65536/", "https://hooks.example:0/x"])
async def test_a_port_that_is_not_one_is_refused(url: str) -> None:
    dns = FakeDns({"hooks.example": [PUBLIC_V4]})
    error = await refused(url, dns=dns)
    assert error.details["reason"] == "invalid port"
    assert dns.calls == []


def test_a_6to4_address_is_refused_even_when_it_embeds_a_public_address() -> None:
    # Deprecated (RFC 7526), and not global for newer Pythons: refused on every version.
    six_to_four = ipaddress.ip_address("2002:5db8:d70e::1")  # 6to4 of 93.184.215.14

    assert refusal_reason(six_to_four, ()) == "not globally routable"
    assert refusal_reason(six_to_four, parse_networks("2002::/16")) is None


async def test_a_public_ip_literal_is_accepted() -> None:
    await check_url(f"https://{PUBLIC_V4}/hooks", HTTPS_ONLY, resolver=FakeDns())
    await check_url(f"https://[{PUBLIC_V6}]:8443/hooks", HTTPS_ONLY, resolver=FakeDns())


# ---------------------------------------------------------------- host names


async def test_a_hostname_resolving_to_a_public_address_is_accepted() -> None:
    dns = FakeDns({"hooks.example.com": [PUBLIC_V4, PUBLIC_V6]})

    await check_url("https://hooks.example.com/in", HTTPS_ONLY, resolver=dns)

    assert dns.calls == [("hooks.example.com", 443)]


async def test_a_hostname_resolving_to_loopback_is_refused() -> None:
    dns = FakeDns({"sneaky.example.com": ["127.0.0.1"]})

    error = await refused("https://sneaky.example.com:8443/", dns=dns)

    assert error.details == {
        "field": "url",
        "reason": "loopback",
        "address": "127.0.0.1",
        "host": "sneaky.example.com",
    }
    assert "'sneaky.example.com' resolves to 127.0.0.1 (loopback)" in error.message
    assert f"{SETTING} (comma-separated CIDRs, e.g. 127.0.0.1/32)" in error.message
    assert dns.calls == [("sneaky.example.com", 8443)]


async def test_every_address_of_a_hostname_must_be_acceptable() -> None:
    dns = FakeDns({"mixed.example.com": [PUBLIC_V4, "10.0.0.7"]})

    error = await refused("https://mixed.example.com/", dns=dns)

    assert error.details["reason"] == "private"
    assert error.details["address"] == "10.0.0.7"
    assert "every address of the host must be reachable" in error.message


async def test_localhost_is_refused_with_the_system_resolver() -> None:
    with pytest.raises(WebhookUrlRefused) as caught:
        await check_url("https://localhost/", HTTPS_ONLY)

    assert caught.value.details["reason"] == "loopback"
    assert "'localhost' resolves to" in caught.value.message


async def test_a_numeric_host_that_is_not_a_dotted_quad_is_judged_by_what_it_resolves_to() -> None:
    # httpx treats "2130706433" as a name; getaddrinfo reads it as 127.0.0.1.
    with pytest.raises(WebhookUrlRefused) as caught:
        await check_url("https://2130706433/", HTTPS_ONLY)

    assert caught.value.details["reason"] == "loopback"
    assert caught.value.details["address"] == "127.0.0.1"


async def test_an_unresolvable_host_is_refused() -> None:
    error = await refused("https://nowhere.invalid/", dns=FakeDns())

    assert error.details == {"field": "url", "reason": "unresolvable", "host": "nowhere.invalid"}
    assert "'nowhere.invalid' could not be resolved" in error.message


async def test_a_host_without_addresses_is_refused() -> None:
    error = await refused("https://empty.example.com/", dns=FakeDns({"empty.example.com": []}))

    assert error.details["reason"] == "unresolvable"
    assert "could not be resolved (no addresses)" in error.message


# ---------------------------------------------------------------- the URL itself


async def test_plain_http_is_refused_unless_allowed() -> None:
    error = await refused(f"http://{PUBLIC_V4}/")

    assert error.details == {"field": "url", "reason": "scheme not allowed", "scheme": "http"}
    assert "must use https://" in error.message
    assert "MEMBERHUB_WEBHOOK_ALLOW_HTTP is true" in error.message

    await check_url(f"http://{PUBLIC_V4}/", HTTP_ALLOWED, resolver=FakeDns())


async def test_other_schemes_are_refused_even_when_http_is_allowed() -> None:
    error = await refused(f"ftp://{PUBLIC_V4}/", HTTP_ALLOWED)

    assert error.details["reason"] == "scheme not allowed"
    assert error.message == "Webhook URLs must use http:// or https://."


async def test_credentials_in_the_url_are_refused() -> None:
    error = await refused(f"https://user:secret@{PUBLIC_V4}/")

    assert error.details == {"field": "url", "reason": "credentials in URL"}
    assert "may not contain credentials" in error.message


async def test_a_url_without_host_is_refused() -> None:
    error = await refused("https:///hooks")

    assert error.details == {"field": "url", "reason": "no host"}
    assert error.message == "The webhook URL has no host."


async def test_a_malformed_url_is_refused() -> None:
    error = await refused("https://[::1/")

    assert error.details == {"field": "url", "reason": "invalid URL"}
    assert error.message.startswith("The webhook URL is not a valid URL:")


# ---------------------------------------------------------------- allowed networks


async def test_an_allowed_network_permits_its_addresses() -> None:
    dns = FakeDns({"dev.internal": ["127.0.0.1"]})

    await check_url("https://127.0.0.1:9000/", LOOPBACK_ALLOWED, resolver=dns)
    await check_url("https://[::ffff:127.0.0.1]/", LOOPBACK_ALLOWED, resolver=dns)
    await check_url("https://dev.internal/", LOOPBACK_ALLOWED, resolver=dns)


async def test_an_allowed_network_permits_nothing_outside_it() -> None:
    error = await refused("https://[::1]/", LOOPBACK_ALLOWED)

    assert error.details["reason"] == "loopback"
    error = await refused("https://10.0.0.1/", LOOPBACK_ALLOWED)
    assert error.details["reason"] == "private"


def test_an_ipv4_address_never_matches_an_ipv6_allowed_network() -> None:
    # ipaddress compares integers only: 0.0.0.1 would otherwise be "in" ::/96.
    reason = refusal_reason(ipaddress.IPv4Address("0.0.0.1"), parse_networks("::/96"))

    assert reason == "not globally routable"


def test_parse_networks_reads_comma_separated_cidrs_ignoring_empty_entries() -> None:
    assert parse_networks(" 127.0.0.0/8, 10.1.0.0/16,, fd00::/8 ,") == (
        ipaddress.IPv4Network("127.0.0.0/8"),
        ipaddress.IPv4Network("10.1.0.0/16"),
        ipaddress.IPv6Network("fd00::/8"),
    )
    assert parse_networks("") == ()
    assert parse_networks(" , ") == ()


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "nonsense"])
def test_parse_networks_names_the_entry_that_is_not_a_network(entry: str) -> None:
    with pytest.raises(ValueError, match="expected an IPv4 or IPv6 network") as caught:
        parse_networks(f"127.0.0.0/8,{entry}")

    assert str(caught.value).startswith(f"Invalid network {entry!r} in {SETTING}:")


def test_parse_networks_refuses_host_bits_so_a_typo_cannot_open_a_larger_network() -> None:
    with pytest.raises(ValueError, match=r"'10\.1\.2\.3/16'.*did you mean 10\.1\.0\.0/16\?"):
        parse_networks("10.1.2.3/16")


def test_the_policy_is_read_from_settings() -> None:
    settings = Settings(webhook_allowed_networks="127.0.0.0/8,10.1.0.0/16", webhook_allow_http=True)

    assert UrlPolicy.from_settings(settings) == UrlPolicy(
        allow_http=True,
        allowed_networks=(
            ipaddress.IPv4Network("127.0.0.0/8"),
            ipaddress.IPv4Network("10.1.0.0/16"),
        ),
    )


# ---------------------------------------------------------------- connect time


@dataclass
class RecordingBackend(httpcore.AsyncNetworkBackend):
    """The inner backend: records where it was asked to connect; fails for `unreachable`."""

    unreachable: set[str] = field(default_factory=set)
    connects: list[tuple[str, int]] = field(default_factory=list)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append((host, port))
        if host in self.unreachable:
            raise httpcore.ConnectError(f"{host} unreachable")
        return httpcore.AsyncMockStream([])

    async def sleep(self, seconds: float) -> None:
        pass


async def test_the_backend_connects_to_the_checked_address_not_the_hostname() -> None:
    inner = RecordingBackend()
    dns = FakeDns({"hooks.example.com": [PUBLIC_V4]})
    backend = GuardedNetworkBackend(HTTPS_ONLY, resolver=dns, inner=inner)

    await backend.connect_tcp("hooks.example.com", 443)

    assert inner.connects == [(PUBLIC_V4, 443)]


async def test_the_backend_tries_each_address_in_order_until_one_connects() -> None:
    inner = RecordingBackend(unreachable={PUBLIC_V6})
    dns = FakeDns({"hooks.example.com": [PUBLIC_V6, PUBLIC_V4]})
    backend = GuardedNetworkBackend(HTTPS_ONLY, resolver=dns, inner=inner)

    await backend.connect_tcp("hooks.example.com", 443)

    assert inner.connects == [(PUBLIC_V6, 443), (PUBLIC_V4, 443)]


async def test_the_backend_reports_the_last_error_when_no_address_connects() -> None:
    inner = RecordingBackend(unreachable={PUBLIC_V4})
    dns = FakeDns({"hooks.example.com": [PUBLIC_V4]})
    backend = GuardedNetworkBackend(HTTPS_ONLY, resolver=dns, inner=inner)

    with pytest.raises(httpcore.ConnectError, match="unreachable"):
        await backend.connect_tcp("hooks.example.com", 443)


async def test_the_backend_refuses_before_connecting_if_any_address_is_refused() -> None:
    inner = RecordingBackend()
    dns = FakeDns({"mixed.example.com": [PUBLIC_V4, "169.254.169.254"]})
    backend = GuardedNetworkBackend(HTTPS_ONLY, resolver=dns, inner=inner)

    with pytest.raises(DestinationRefused) as caught:
        await backend.connect_tcp("mixed.example.com", 443)

    assert caught.value.reason == "link-local"
    assert caught.value.address == "169.254.169.254"
    assert "'mixed.example.com', which resolves to 169.254.169.254 (link-local)" in str(
        caught.value
    )
    assert SETTING in str(caught.value)
    assert inner.connects == []


async def test_the_backend_judges_an_ip_literal_without_resolving_it() -> None:
    dns = FakeDns()
    backend = GuardedNetworkBackend(HTTPS_ONLY, resolver=dns, inner=RecordingBackend())

    with pytest.raises(DestinationRefused) as caught:
        await backend.connect_tcp("::ffff:10.0.0.1", 443)

    assert caught.value.reason == "private"
    assert dns.calls == []


async def test_the_backend_reports_an_unresolvable_host_as_a_connect_error() -> None:
    backend = GuardedNetworkBackend(HTTPS_ONLY, resolver=FakeDns(), inner=RecordingBackend())

    with pytest.raises(httpcore.ConnectError, match=r"Could not resolve 'gone\.example\.com'"):
        await backend.connect_tcp("gone.example.com", 443)


async def test_the_backend_refuses_unix_sockets() -> None:
    backend = GuardedNetworkBackend(LOOPBACK_ALLOWED, inner=RecordingBackend())

    with pytest.raises(DestinationRefused) as caught:
        await backend.connect_unix_socket("/var/run/docker.sock")

    assert caught.value.reason == "unix socket"
    assert "Refusing to connect to /var/run/docker.sock (unix socket)" in str(caught.value)


def test_the_transport_refuses_a_proxy_which_would_bypass_the_check() -> None:
    with pytest.raises(ValueError, match="'proxy'"):
        guarded_transport(HTTPS_ONLY, proxy="http://proxy.example.com:3128")


# ---------------------------------------------------------------- through httpx, end to end


@dataclass
class LocalServer:
    port: int
    request_heads: list[bytes]


@pytest.fixture
async def local_server() -> AsyncIterator[LocalServer]:
    """A minimal HTTP/1.1 server on 127.0.0.1 answering 200 "ok" to everything."""
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield LocalServer(port=port, request_heads=heads)


def client(policy: UrlPolicy, dns: FakeDns) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=guarded_transport(policy, resolver=dns), trust_env=False)


async def test_a_request_to_a_hostname_resolving_to_loopback_is_refused(
    local_server: LocalServer,
) -> None:
    dns = FakeDns({"hooks.example.com": ["127.0.0.1"]})

    async with client(HTTP_ALLOWED, dns) as http:
        with pytest.raises(DestinationRefused) as caught:
            await http.post(f"http://hooks.example.com:{local_server.port}/in", content=b"{}")

    assert caught.value.reason == "loopback"
    assert caught.value.address == "127.0.0.1"
    assert local_server.request_heads == []


async def test_a_request_to_an_allowed_network_goes_through_with_the_hostname_as_host(
    local_server: LocalServer,
) -> None:
    dns = FakeDns({"hooks.example.com": ["127.0.0.1"]})

    async with client(LOOPBACK_ALLOWED, dns) as http:
        response = await http.post(
            f"http://hooks.example.com:{local_server.port}/in", content=b"{}"
        )

    assert response.status_code == 200
    assert response.text == "ok"
    [head] = local_server.request_heads
    assert head.startswith(b"POST /in HTTP/1.1\r\n")
    assert f"Host: hooks.example.com:{local_server.port}\r\n".encode() in head


async def test_a_host_rebinding_to_loopback_after_registration_is_refused_at_send_time(
    local_server: LocalServer,
) -> None:
    url = f"http://rebind.example.com:{local_server.port}/in"
    dns = FakeDns(
        {"rebind.example.com": [PUBLIC_V4]}, rebind_to={"rebind.example.com": ["127.0.0.1"]}
    )

    await check_url(url, HTTP_ALLOWED, resolver=dns)  # registration sees a public address
    async with client(HTTP_ALLOWED, dns) as http:
        with pytest.raises(DestinationRefused) as caught:
            await http.post(url, content=b"{}")

    assert caught.value.host == "rebind.example.com"
    assert caught.value.reason == "loopback"
    assert caught.value.address == "127.0.0.1"
    assert local_server.request_heads == []
    assert len(dns.calls) == 2


async def test_a_host_rebinding_into_an_allowed_network_is_delivered(
    local_server: LocalServer,
) -> None:
    url = f"http://rebind.example.com:{local_server.port}/in"
    dns = FakeDns(
        {"rebind.example.com": [PUBLIC_V4]}, rebind_to={"rebind.example.com": ["127.0.0.1"]}
    )

    await check_url(url, LOOPBACK_ALLOWED, resolver=dns)
    async with client(LOOPBACK_ALLOWED, dns) as http:
        response = await http.post(url, content=b"{}")

    assert response.status_code == 200
    assert len(local_server.request_heads) == 1


# ---------------------------------------------------------------- bare hosts (SMTP)


async def test_a_bare_host_is_judged_as_a_urls_host_is() -> None:
    dns = FakeDns(answers={"relay.example": [PUBLIC_V4, "10.0.0.25"], "ok.example": [PUBLIC_V4]})
    await check_host("ok.example", 587, HTTPS_ONLY, resolver=dns)
    await check_host(PUBLIC_V4, 587, HTTPS_ONLY, resolver=dns)
    assert dns.calls == [("ok.example", 587)]  # a literal is not looked up

    with pytest.raises(WebhookUrlRefused) as caught:
        await check_host("relay.example", 587, HTTPS_ONLY, what="SMTP host", resolver=dns)
    assert caught.value.details["reason"] == "private"
    assert caught.value.details["address"] == "10.0.0.25"
    assert caught.value.message.startswith("The SMTP host 'relay.example' resolves to 10.0.0.25")
    assert SETTING in caught.value.message

    with pytest.raises(WebhookUrlRefused) as caught:
        await check_host("[::1]", 25, HTTPS_ONLY, resolver=dns)
    assert caught.value.details["reason"] == "loopback"
    with pytest.raises(WebhookUrlRefused) as caught:
        await check_host("missing.example", 25, HTTPS_ONLY, resolver=dns)
    assert caught.value.details["reason"] == "unresolvable"
    await check_host("127.0.0.1", 25, LOOPBACK_ALLOWED, resolver=dns)


async def test_the_addresses_to_connect_to_are_resolved_and_checked_each_time() -> None:
    dns = FakeDns(answers={"relay.example": [PUBLIC_V4]}, rebind_to={"relay.example": ["::1"]})
    assert await allowed_addresses("relay.example", 25, HTTPS_ONLY, resolver=dns) == [PUBLIC_V4]

    # Looked up again: now it rebinds to loopback, which is refused (::1 is not inside
    # 127.0.0.0/8 either).
    for policy in (HTTPS_ONLY, LOOPBACK_ALLOWED):
        with pytest.raises(DestinationRefused) as caught:
            await allowed_addresses("relay.example", 25, policy, resolver=dns)
        assert (caught.value.reason, caught.value.address) == ("loopback", "::1")
    assert len(dns.calls) == 3

    assert await allowed_addresses("127.0.0.1", 25, LOOPBACK_ALLOWED, resolver=dns) == ["127.0.0.1"]
    with pytest.raises(DestinationRefused) as caught:
        await allowed_addresses("127.0.0.1", 25, HTTPS_ONLY, resolver=dns)
    assert caught.value.address is None  # the host is the address
    empty = FakeDns(answers={"empty.example": []})
    with pytest.raises(OSError, match="no addresses"):
        await allowed_addresses("empty.example", 25, HTTPS_ONLY, resolver=empty)
