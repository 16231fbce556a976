"""The destination service: turns sources of truth (registrations on one machine,
Kubernetes in a cluster) into ``shoal_endpoints`` entries that proxies watch."""
