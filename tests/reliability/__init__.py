"""Reliability suite: races, faults and hostile input against real redis-server processes."""
