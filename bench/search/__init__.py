"""Benchmarks of the search service: ingest, queries, recall, the query cache, a shared catalog."""
