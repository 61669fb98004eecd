"""Hostile input: garbage written where the cluster reads, and the cluster must not care."""
