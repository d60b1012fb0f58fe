"""The encoder service: CLIP image and text embeddings over gRPC, dynamically batched."""
