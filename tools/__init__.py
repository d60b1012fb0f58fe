"""Developer tools: generators of documentation from the code."""
