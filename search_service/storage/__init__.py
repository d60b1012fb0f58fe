"""The catalog, the source of truth: products, their vectors and the deletions log in SQL."""
