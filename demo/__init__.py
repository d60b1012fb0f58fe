"""The demo: a synthetic fashion catalog and `make run`, which indexes it and answers a query."""
