"""The search page: an ASGI app that is one more client of the Search RPC."""
