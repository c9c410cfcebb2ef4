"""Monitoring: /health and /metrics over HTTP, and the same picture for `collector status`."""
