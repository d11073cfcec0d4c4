"""Release: lineage checks, merge, registry, storage, inference and serving."""
