"""Helpers for testing with redmap: real redis-server processes started on demand."""
