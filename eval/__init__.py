"""Metrics, gates and reports."""
