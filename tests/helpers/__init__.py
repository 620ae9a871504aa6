"""Helpers shared by the test modules (tiny fixtures built from ../shared)."""
