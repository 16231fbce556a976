"""The demo application, an emojivoto look-alike: ``emoji`` and ``voting`` (gRPC),
``web`` (HTTP page and JSON API, a gRPC client of both), ``vote_bot`` (steady load) and
``local`` (all of them on loopback, unmeshed). Each runs as ``python -m shoal.demo.<name>``
and knows nothing of the mesh: meshed, it reaches its peers through the proxy variables
its clients already honour (``grpc_proxy`` for gRPC, ``http_proxy`` for HTTP)."""
