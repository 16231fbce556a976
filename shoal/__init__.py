"""Shoal: a service mesh whose control plane coordinates over NATS.

The folders at the top of the repository are the layers (``schemas/``, ``kernel/``,
``proxy/``, ``services/``, ``cli/``, ``demo/``); this package maps them under one import
name so that nothing called ``proxy`` or ``schemas`` lands bare in a user's site-packages.
"""

__version__ = "0.1.0"
