"""The indexer: streams a catalog on disk through the encoders into the search service."""
