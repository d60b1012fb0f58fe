"""The gRPC face of the search service: the vpm.v1.Search servicer and the conversions
between its messages and the domain's objects (the engine knows no protobuf)."""
