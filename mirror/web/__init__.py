"""The web layer: Starlette routes, client auth, admin API, access log, the server, TLS."""
