"""The operator's tools: the ``shoal`` command. Top layer: may import every layer below."""
