"""A fake Binance exchange (WebSocket + REST on one port) for tests, benchmarks and `make demo`."""
