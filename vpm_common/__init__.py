"""Small pieces shared by services and clients: settings, logging, gRPC plumbing; no torch."""
