"""Shoal's wire contract: every message on the bus, and the subject and bucket names.

This package is the bottom layer and imports nothing else of Shoal's. Every message is a
frozen msgspec Struct encoded as JSON, so any NATS client in any language can read tap
events and publish policy. Within ``v1`` a message may only gain optional fields, and
readers ignore fields they do not know, so old readers survive new writers.
"""
