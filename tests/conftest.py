"""Shared pytest configuration: the real-server and real-process fixtures."""

pytest_plugins = ["cloister.testing.pytest_plugin"]
