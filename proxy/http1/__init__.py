"""The HTTP/1.1 engine: ``framing`` (pure decisions over parsed heads), ``server`` (the
downstream asyncio Protocol), ``client`` (upstream connections and their keep-alive pool),
``flow`` (who pauses whom). httptools parses on both sides."""
