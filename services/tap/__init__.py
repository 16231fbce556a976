"""The tap service: opens, extends and closes tap sessions in ``shoal_tap`` with caps,
and relays events to clients that cannot subscribe to NATS themselves."""
