"""Pure knowledge of Binance: stream names and paths, URLs, payload parsing. No I/O here."""
