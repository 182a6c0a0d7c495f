"""Mixers registered by the tests (docs/guide.md, "Add a mixer"): tests/conftest.py imports every module
here before collection, so each one goes through every all-mixer test."""
