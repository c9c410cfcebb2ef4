"""binance-collector: records Binance Spot and USD-M futures market data into TimescaleDB.

Data flows streams -> Redis -> tasks -> db, and so do the sub-packages:
`streams` (WebSocket -> Redis lists), `queue` (Redis keys, the envelope, Lua, counters), `tasks` (Celery
shells), `db` (schema, COPY, Timescale SQL), `binance` (pure: stream names, URLs, payload parsing),
`gaps` (the gap ledger's records), `alerts` (pure liquidation rules), `web` (/health, /metrics),
`fake` (a local fake Binance, with its recordings), `local` (private Redis and PostgreSQL for tests,
benchmarks and `make run`). tests/test_layout.py holds the imports to this order.
"""

__version__ = "0.1.0"
