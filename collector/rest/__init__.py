"""Binance REST I/O: a rate-limit-aware HTTP client and the pollers that queue what it fetches."""
