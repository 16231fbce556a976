"""The proxy's HTTP/2 engine: a codec seam (codec.py) with its h2-backed implementation
(h2codec.py), pure header and gRPC rules (headers.py, grpc.py), and the socket side:
client connections (server.py), upstream connections and their pool (client.py) and the
stream pairs that relay one request between them (exchange.py)."""
