"""The in-memory index derived from the catalog: vectors (FAISS, CPU or GPU), filters, facets,
and the mirror that keeps them in step with the catalog."""
