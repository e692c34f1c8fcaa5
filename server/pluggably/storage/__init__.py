"""Storage: StorageService (disk usage, pruning, the artifact store)."""
