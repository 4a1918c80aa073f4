"""Metrics of generated videos."""
