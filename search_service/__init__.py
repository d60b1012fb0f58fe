"""The search service: a FAISS index and a SQL catalog behind the vpm.v1.Search RPC."""
