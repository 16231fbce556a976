"""The original destination of a redirected connection (transparent mode).

With ``shoal proxy-init``'s iptables REDIRECT rules (the Kubernetes issue), the app's
outbound connections land on the outbound port, and the kernel remembers where they were
going: ``SO_ORIGINAL_DST`` on the accepted socket (Linux netfilter, IPv4). This is the one
piece transparent mode adds to the outbound path: its result becomes the
``connect_upstream`` target for accept.classify, as the port-mapped listeners do today.
"""

from __future__ import annotations

import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
_SOCKADDR_IN_BYTES = 16


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """Where the client meant to connect, or None when the connection was not redirected
    (or the platform has no netfilter)."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_BYTES)
    except OSError:
        return None
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port
