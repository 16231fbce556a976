"""The data plane: one proxy beside every workload.

Rooms are named after the path traffic takes (as in linkerd2-proxy): ``outbound``
(authority -> service -> balancer -> endpoint), ``inbound`` (accept -> detect -> the local
app), ``admin`` (metrics, readiness, shutdown). ``http1/`` is the HTTP/1.1 engine,
``config`` the fixed settings and ``runtime`` the live handles. Run it with
``python -m shoal.proxy`` or ``shoal proxy``; see docs/proxy.md.
"""
