"""Shoal's shared kernel: bus connection and roles, configuration, logging, the embedded
NATS launcher, and the X.509 and token primitives. Imports only ``shoal.schemas``."""
