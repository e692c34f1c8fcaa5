"""The model catalog: ModelService (listing, lookup, parameter documentation)."""
