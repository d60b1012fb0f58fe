"""Small pieces shared by the services and clients: settings, logging, gRPC plumbing (no torch, no faiss)."""
