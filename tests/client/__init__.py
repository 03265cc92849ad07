"""Tests of the Python client and its CLI, against a real server on loopback."""
