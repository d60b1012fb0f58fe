"""The one client of the encoders, used by the search service and the indexer, and its targets."""
