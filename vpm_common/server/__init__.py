"""The gRPC server plumbing both services share: bootstrap, error boundary, guards, deadlines."""
