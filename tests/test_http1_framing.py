"""The HTTP/1 framing decisions, authority parsing, error rendering and configuration, as
plain values in and out: no sockets."""

from __future__ import annotations

import httptools
import pytest

from shoal.proxy import errors
from shoal.proxy.config import ConfigError, load, parse_ports, parse_static, parse_upstream
from shoal.proxy.http1 import framing as f
from shoal.proxy.http1.framing import Body
from shoal.proxy.outbound import canonical_authority, parse_authority


def request(headers: list[tuple[bytes, bytes]], method: bytes = b"GET", minor: int = 1,
            target: bytes = b"/") -> f.RequestHead:
    return f.analyze_request(method, target, minor, [(b"Host", b"web"), *headers])


def response(headers: list[tuple[bytes, bytes]], status: int = 200, minor: int = 1,
             req: f.RequestHead | None = None) -> f.ResponseHead:
    return f.analyze_response(status, b"OK", minor, headers, req or request([]))


# -- requests ------------------------------------------------------------------------------


def test_request_body_framing() -> None:
    assert request([]).body is Body.NONE
    head = request([(b"Content-Length", b"12")])
    assert (head.body, head.content_length) == (Body.LENGTH, 12)
    assert request([(b"content-length", b"0")]).body is Body.NONE
    assert request([(b"Content-Length", b"5, 5")]).content_length == 5  # RFC 9110 8.6
    head = request([(b"Transfer-Encoding", b"gzip, chunked")])
    assert head.body is Body.CHUNKED and head.transfer_encoding == b"gzip, chunked"


@pytest.mark.parametrize("headers", [
    [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],  # smuggling
    [(b"Transfer-Encoding", b"gzip")],  # a request body must end in chunked
    [(b"Content-Length", b"5"), (b"Content-Length", b"6")],
    [(b"Content-Length", b"-1")],
    [(b"Content-Length", b"1e3")],
    [(b"Host", b"other")],  # two Host fields
])
def test_unsafe_requests_are_refused(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(errors.MalformedRequest) as raised:
        request(headers)
    assert raised.value.status == 400 and raised.value.fatal


def test_http11_needs_host_and_http10_does_not() -> None:
    with pytest.raises(errors.MalformedRequest):
        f.analyze_request(b"GET", b"/", 1, [])
    head = f.analyze_request(b"GET", b"/", 0, [])
    assert head.host is None and not head.keep_alive


def test_hop_by_hop_and_connection_listed_fields_are_dropped() -> None:
    head = request([
        (b"Connection", b"keep-alive, X-Secret"), (b"Keep-Alive", b"timeout=5"),
        (b"X-Secret", b"1"), (b"TE", b"trailers"), (b"Proxy-Authorization", b"Basic x"),
        (b"Proxy-Connection", b"keep-alive"), (b"Upgrade", b"h2c"), (b"X-Kept", b"2"),
        (b"Content-Length", b"3"),
    ])
    names = [name.lower() for name, _ in head.headers]
    assert names == [b"host", b"x-kept", b"content-length"]
    assert head.upgrade is None  # "upgrade" not listed in Connection


def test_every_hop_by_hop_name_is_dropped_both_ways() -> None:
    for name in f.HOP_BY_HOP:
        assert f.REQUEST_FIELDS[name] >= 4 and f.RESPONSE_FIELDS[name] >= 4  # not kept


def test_keep_alive_rules() -> None:
    assert request([]).keep_alive
    assert not request([(b"Connection", b"close")]).keep_alive
    assert not f.analyze_request(b"GET", b"/", 0, []).keep_alive
    assert f.analyze_request(b"GET", b"/", 0, [(b"Connection", b"Keep-Alive")]).keep_alive


def test_upgrade_and_expect() -> None:
    head = request([(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")])
    assert head.upgrade == b"websocket"
    rendered = f.render_request_head(head)
    assert b"Connection: upgrade\r\nUpgrade: websocket\r\n" in rendered
    # HTTP/1.0 upgrades are ignored (RFC 9110 7.8), and so is its Expect (10.1.1).
    old = f.analyze_request(b"GET", b"/", 0, [(b"Connection", b"upgrade"),
                                             (b"Upgrade", b"websocket"),
                                             (b"Expect", b"100-continue")])
    assert old.upgrade is None and not old.expect_continue
    assert request([(b"Expect", b"100-Continue")]).expect_continue


def test_render_request_head_rewrites_host_and_rechunks() -> None:
    head = request([(b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")], method=b"POST")
    head.target = b"/path?q=1"
    head.host = b"web.ns:8080"
    head.rewrite_host = True
    assert f.render_request_head(head) == (
        b"POST /path?q=1 HTTP/1.1\r\nHost: web.ns:8080\r\nX-A: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")
    old = f.analyze_request(b"GET", b"/", 0, [])
    old.host, old.rewrite_host = b"app:80", True
    assert f.render_request_head(old) == b"GET / HTTP/1.1\r\nHost: app:80\r\n\r\n"


def test_rendered_request_parses_back() -> None:
    head = request([(b"Content-Length", b"4"), (b"X-Y", b"z")], method=b"PUT")
    seen: dict[str, object] = {"headers": []}

    class Sink:
        def on_url(self, url: bytes) -> None:
            seen["url"] = url

        def on_header(self, name: bytes, value: bytes) -> None:
            seen["headers"].append((name, value))  # type: ignore[attr-defined]

        def on_body(self, body: bytes) -> None:
            seen["body"] = body

    parser = httptools.HttpRequestParser(Sink())
    parser.feed_data(f.render_request_head(head) + b"data")
    assert seen["url"] == b"/" and seen["body"] == b"data"
    assert parser.get_method() == b"PUT"


# -- responses -----------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "method", "headers", "body"), [
    (200, b"GET", [(b"Content-Length", b"3")], Body.LENGTH),
    (200, b"GET", [(b"Transfer-Encoding", b"chunked")], Body.CHUNKED),
    (200, b"GET", [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3")],
     Body.CHUNKED),
    (200, b"GET", [(b"Transfer-Encoding", b"gzip")], Body.CLOSE),
    (200, b"GET", [], Body.CLOSE),
    (200, b"HEAD", [(b"Content-Length", b"3")], Body.NONE),
    (204, b"GET", [], Body.NONE),
    (304, b"GET", [(b"Content-Length", b"3")], Body.NONE),
    (100, b"GET", [], Body.NONE),
])
def test_response_body_framing(status: int, method: bytes, headers: list[tuple[bytes, bytes]],
                               body: Body) -> None:
    resp = response(headers, status=status, req=request([], method=method))
    assert resp.body is body
    if body is Body.CLOSE:
        assert not resp.keep_alive  # a close-delimited body ends the connection


def test_transfer_encoding_overrides_content_length() -> None:
    resp = response([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3")])
    assert [n.lower() for n, _ in resp.headers] == []


def test_response_keep_alive_and_hop_by_hop() -> None:
    resp = response([(b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"),
                     (b"Content-Length", b"0"), (b"Server", b"x")])
    assert resp.keep_alive
    assert [n for n, _ in resp.headers] == [b"Content-Length", b"Server"]
    assert not response([(b"Connection", b"close"), (b"Content-Length", b"0")]).keep_alive
    assert not response([(b"Content-Length", b"0")], minor=0).keep_alive


def test_switching_protocols_needs_an_upgrade_request() -> None:
    upgrade = request([(b"Connection", b"upgrade"), (b"Upgrade", b"websocket")])
    resp = response([(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")], status=101,
                    req=upgrade)
    assert resp.upgrade == b"websocket" and not resp.keep_alive
    with pytest.raises(errors.UpstreamMalformed):
        response([(b"Upgrade", b"websocket")], status=101)


def test_downstream_framing_for_http10_clients_and_early_responses() -> None:
    chunked = response([(b"Transfer-Encoding", b"chunked")])
    old_client = f.analyze_request(b"GET", b"/", 0, [(b"Connection", b"keep-alive")])
    assert f.downstream_body(chunked, old_client) is Body.CLOSE
    assert f.must_close_downstream(chunked, old_client, Body.CLOSE, True, False)
    new_client = request([])
    assert f.downstream_body(chunked, new_client) is Body.CHUNKED
    assert not f.must_close_downstream(chunked, new_client, Body.CHUNKED, True, False)
    # The upstream answered before the request body ended: close after the response.
    assert f.must_close_downstream(chunked, new_client, Body.CHUNKED, False, False)
    assert f.must_close_downstream(chunked, new_client, Body.CHUNKED, True, True)  # drain


def test_render_response_head() -> None:
    resp = response([(b"Transfer-Encoding", b"chunked"), (b"X", b"1")])
    head = b"".join(f.render_response_head(resp, Body.CHUNKED, False, 1))
    assert head == b"HTTP/1.1 200 OK\r\nX: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    head = b"".join(f.render_response_head(resp, Body.CLOSE, True, 0))
    assert head == b"HTTP/1.1 200 OK\r\nX: 1\r\nConnection: close\r\n\r\n"
    plain = response([(b"Content-Length", b"0")])
    assert b"Connection: keep-alive" in b"".join(f.render_response_head(plain, Body.NONE,
                                                                         False, 0))


def test_chunks_and_trailers() -> None:
    assert f.chunk_header(255) == b"ff\r\n"
    assert f.last_chunk([]) == b"0\r\n\r\n"
    assert f.last_chunk([(b"X-Sum", b"1")]) == b"0\r\nX-Sum: 1\r\n\r\n"


def test_absolute_form() -> None:
    assert f.split_absolute_form(b"/x") is None
    assert f.split_absolute_form(b"*") is None
    assert f.split_absolute_form(b"http://web.ns:80/a?b") == (b"web.ns:80", b"/a?b")
    assert f.split_absolute_form(b"HTTP://user:pw@web?q") == (b"web", b"/?q")
    with pytest.raises(errors.MalformedRequest):
        f.split_absolute_form(b"ftp://web/")


def test_retryable_requests() -> None:
    assert f.is_retryable(request([]))
    assert not f.is_retryable(request([], method=b"POST"))
    assert not f.is_retryable(request([(b"Content-Length", b"3")], method=b"PUT"))


# -- errors --------------------------------------------------------------------------------


def test_errors_render_with_both_headers() -> None:
    raw = errors.render(errors.UnknownService("unknown service x.y\r\nInjected: 1"),
                        close=True)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    assert b"shoal-proxy-error: unknown service x.y??Injected: 1" in lines
    assert b"l5d-proxy-error: unknown service x.y??Injected: 1" in lines
    assert b"connection: close" in lines
    assert body == b"unknown service x.y??Injected: 1\n"
    head_only = errors.render(errors.UpstreamRefused("refused"), close=False, head_only=True)
    assert head_only.endswith(b"\r\n\r\n") and b"content-length: 8" in head_only


@pytest.mark.parametrize(("error", "status"), [
    (errors.MalformedRequest, 400), (errors.HeadersTooLarge, 431),
    (errors.RequestTargetTooLong, 414), (errors.UnknownService, 503),
    (errors.NoEndpoints, 503), (errors.UpstreamRefused, 502), (errors.UpstreamReset, 502),
    (errors.UpstreamConnectTimeout, 504), (errors.ResponseTimeout, 504),
    (errors.RequestHeadTimeout, 408),
])
def test_error_statuses(error: type[errors.ProxyError], status: int) -> None:
    assert error("x").status == status
    assert errors.render(error("x"), close=True).startswith(b"HTTP/1.1 %d " % status)


# -- authorities ---------------------------------------------------------------------------


@pytest.mark.parametrize(("authority", "service", "namespace", "port"), [
    (b"web", "web", "home", None),
    (b"web:8080", "web", "home", 8080),
    (b"web.emojivoto", "web", "emojivoto", None),
    (b"Web.EmojiVoto:80", "web", "emojivoto", 80),
    (b"web.emojivoto.svc", "web", "emojivoto", None),
    (b"web.emojivoto.svc.cluster.local:8080", "web", "emojivoto", 8080),
    (b"web.emojivoto.svc.cluster.local.", "web", "emojivoto", None),
])
def test_parse_authority(authority: bytes, service: str, namespace: str,
                         port: int | None) -> None:
    name, parsed_port = parse_authority(authority, "home", "cluster.local")
    assert (name.service, name.namespace, parsed_port) == (service, namespace, port)


@pytest.mark.parametrize(("authority", "error"), [
    (b"127.0.0.1:80", errors.UnknownService),
    (b"[::1]:80", errors.UnknownService),
    (b"example.com.evil.org", errors.UnknownService),
    (b"web:99999", errors.BadAuthority),
    (b"web:x", errors.BadAuthority),
    (b"we_b", errors.BadAuthority),
    (b"web..ns", errors.BadAuthority),
    (b"\xff", errors.BadAuthority),
])
def test_parse_authority_refuses(authority: bytes, error: type[errors.ProxyError]) -> None:
    with pytest.raises(error):
        parse_authority(authority, "home", "cluster.local")


def test_canonical_authority() -> None:
    name, port = parse_authority(b"web.ns:80", "x", "cluster.local")
    assert canonical_authority(name, port, "cluster.local") == "web.ns.svc.cluster.local:80"


# -- configuration -------------------------------------------------------------------------


def test_config_from_flags_and_environment() -> None:
    env = {"SHOAL_PROXY_APP_PORT": "8080", "SHOAL_PROXY_NAMESPACE": "shop",
           "SHOAL_PROXY_UPSTREAM": "5000=db.data:5432;6000=cache",
           "SHOAL_PROXY_RESPONSE_TIMEOUT": "0"}
    config = load(["--no-bus", "--service", "cart", "--outbound-port", "5140",
                   "--static-endpoint", "db.data=127.0.0.1:5433,127.0.0.2:5433"], env)
    assert config.app_port == 8080 and config.namespace == "shop"
    assert config.outbound_port == 5140 and config.inbound_port == 4143
    assert config.admin_port == 4191
    assert [(m.local_port, str(m.target), m.port) for m in config.upstreams] == [
        (5000, "db.data", 5432), (6000, "cache.shop", None)]
    assert config.static[0].endpoints == (("127.0.0.1", 5433), ("127.0.0.2", 5433))
    assert config.http1.response_timeout == 0
    assert config.bus is None and not config.registers
    assert config.workload == "cart" and config.pod.startswith("cart-")


@pytest.mark.parametrize("argv", [
    ["--no-bus", "--app-port", "x"],
    ["--no-bus", "--upstream", "nope"],
    ["--no-bus", "--upstream", "1=a:70000"],
    ["--no-bus", "--namespace", "Bad_NS"],
    ["--no-bus", "--idle-timeout", "-1"],
    ["--no-bus", "--upstream", "5000=a", "--upstream", "5000=b"],
])
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        load(argv, {})
    assert raised.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_no_bus_found_is_a_clear_error(tmp_path: object, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    with pytest.raises(SystemExit):
        load(["--state-dir", str(tmp_path)], {})
    assert "--no-bus" in capsys.readouterr().err


def test_config_helpers() -> None:
    assert parse_ports("25, 80-82") == frozenset({25, 80, 81, 82})
    with pytest.raises(ConfigError):
        parse_static("a.b=host", "ns")
    assert parse_upstream("1=svc", "ns").target.namespace == "ns"


def test_original_destination_of_a_plain_connection_is_none() -> None:
    import socket

    from shoal.proxy.origdst import original_destination

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            assert original_destination(accepted) is None  # not redirected by iptables
