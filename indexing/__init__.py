"""mimdex.indexing."""
