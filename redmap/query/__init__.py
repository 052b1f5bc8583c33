"""Queries: column expressions (`expression`) and `select()` with its compilation to
Redis commands (`select`). Import public names from `redmap`."""
