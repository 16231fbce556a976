"""The web dashboard: a control-plane service that serves a live single-page view of the
mesh (namespaces, workloads, a workload's edges, routes and top, and tap) to browsers,
reading everything through the control plane's NATS APIs (metrics queries, tap
sessions and tap subjects) and pushing updates as server-sent events."""
