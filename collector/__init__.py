"""binance-collector: records Binance Spot and USD-M futures market data into TimescaleDB.

Data flows streams -> Redis -> tasks -> db, and so do the sub-packages:
`streams` (WebSocket -> Redis lists), `queue` (Redis keys, Lua, counters), `tasks` (Celery shells),
`db` (schema, COPY, Timescale SQL), `binance` (pure: stream names, URLs, payload parsing),
`alerts` (pure liquidation rules), `web` (/health, /metrics), `fake` (a local fake Binance).
"""

__version__ = "0.1.0"
