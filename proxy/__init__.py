"""The data plane: the proxy that runs beside every workload (accept -> detect -> route ->
forward), its discovery over NATS, balancing, metrics and admin endpoints."""
