"""Configuration files of the benchmark peers, as plain text built from ports and paths.

They follow shared/bench-anchor/: nginx with one worker returning a 3-byte 200, Envoy's
HTTP connection manager routing everything to one static cluster with no access log,
HAProxy in http mode with keep-alive and one thread. The two-proxy (mesh hop) Envoy
variant chains two such Envoys, optionally with mutual TLS and identity checks on both
sides, which is what a Linkerd-like mesh does between its proxies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The anchor's nginx ran with keepalive_requests 1000000; a 10 s run at 70k req/s over
# 50 connections is ~14k per connection, but a long --reps run through one connection
# (-c1) must never see a server-side close mid-measure, so this is far above any run.
NGINX_KEEPALIVE_REQUESTS = 100_000_000
# The anchor's values: ample for wrk's at most a few hundred connections.
NGINX_WORKER_CONNECTIONS = 4096
HAPROXY_MAXCONN = 4096
# Envoy's and HAProxy's connect timeout to the upstream (the anchor's 1 s): a loopback
# connect either succeeds at once or the upstream is gone.
CONNECT_TIMEOUT_SECONDS = 1


def nginx_conf(workdir: Path, port: int) -> str:
    """nginx upstream: one worker, ``ok\\n`` (3 bytes) for every request, no logging."""
    tmp = workdir / "nginx-tmp"
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""\
worker_processes 1;
daemon off;
master_process on;
pid {workdir / "nginx.pid"};
error_log {workdir / "nginx-error.log"} warn;
events {{ worker_connections {NGINX_WORKER_CONNECTIONS}; }}
http {{
    access_log off;
    keepalive_timeout 65s;
    keepalive_requests {NGINX_KEEPALIVE_REQUESTS};
{temp_paths}
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def haproxy_cfg(listen_port: int, upstream_port: int) -> str:
    """HAProxy: one thread, http mode, keep-alive to both sides (the anchor's file)."""
    return f"""\
global
    nbthread 1
    maxconn {HAPROXY_MAXCONN}
defaults
    mode http
    timeout connect {CONNECT_TIMEOUT_SECONDS}s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend fe
    bind 127.0.0.1:{listen_port}
    default_backend be
backend be
    server upstream 127.0.0.1:{upstream_port}
"""


@dataclass(frozen=True)
class TlsFiles:
    """One side's certificate, key and the CA it trusts, plus the identity (a DNS SAN)
    it requires of the peer on the other side of the connection."""

    cert: Path
    key: Path
    ca: Path
    peer_identity: str


def _tls_context(tls: TlsFiles) -> dict[str, Any]:
    return {
        "tls_certificates": [{"certificate_chain": {"filename": str(tls.cert)},
                              "private_key": {"filename": str(tls.key)}}],
        "validation_context": {
            "trusted_ca": {"filename": str(tls.ca)},
            "match_typed_subject_alt_names": [
                {"san_type": "DNS", "matcher": {"exact": tls.peer_identity}}],
        },
    }


def envoy_config(listen_port: int, admin_port: int, upstream_port: int, *,
                 downstream_tls: TlsFiles | None = None,
                 upstream_tls: TlsFiles | None = None) -> str:
    """Envoy bootstrap (JSON, which Envoy reads as YAML): the anchor's listener and
    cluster; with ``downstream_tls`` the listener requires a client certificate of the
    given identity, with ``upstream_tls`` the cluster presents one and checks the
    server's identity."""
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                     "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "ingress",
            "codec_type": "AUTO",
            "route_config": {"virtual_hosts": [{
                "name": "all", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
            }]},
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters."
                                          "http.router.v3.Router"},
            }],
        },
    }
    chain: dict[str, Any] = {"filters": [hcm]}
    if downstream_tls is not None:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                         "DownstreamTlsContext",
                "require_client_certificate": True,
                "common_tls_context": _tls_context(downstream_tls),
            },
        }
    cluster: dict[str, Any] = {
        "name": "upstream",
        "type": "STATIC",
        "connect_timeout": f"{CONNECT_TIMEOUT_SECONDS}s",
        "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": upstream_port}}}}]}]},
    }
    if upstream_tls is not None:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                         "UpstreamTlsContext",
                "sni": upstream_tls.peer_identity,
                "common_tls_context": _tls_context(upstream_tls),
            },
        }
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "l0",
                "address": {"socket_address": {"address": "127.0.0.1",
                                               "port_value": listen_port}},
                "filter_chains": [chain],
            }],
            "clusters": [cluster],
        },
    }
    return json.dumps(config, indent=1) + "\n"
