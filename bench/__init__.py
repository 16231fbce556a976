"""Shoal's benchmark harness: the same wrk load against a direct connection to an nginx
upstream, against Envoy and HAProxy configured as comparable one-worker HTTP proxies, and
against the Shoal proxy (one hop, and a mesh hop of two proxies), all in one run on one
machine, with the proxy under test pinned alone to its own core.

Run it as ``python -m bench`` (``make bench``); ``python -m bench --help`` lists the knobs.
Modules: ``wrk`` (running wrk and parsing its output, sans-IO where it can be),
``configs`` (peer configuration files as plain text), ``tlsgen`` (a throwaway CA for the
mTLS peers), ``procs`` (child processes that are always stopped), ``peers`` (one
definition per peer: how to start it and where wrk points), ``report`` (medians, ratios,
the table and the JSON record) and ``run`` (the command line and the measuring loop).
"""
