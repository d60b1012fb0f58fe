"""The search service's side of the encoders: query embedding and its cache."""
