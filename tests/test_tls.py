"""The collector over TLS (`wss://`, `https://`) from the fake exchange started with `tls=True`."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import orjson
import pytest
import redis

from collector.db.init import init_db
from collector.fake.server import FakeExchange
from collector.queue import keys
from collector.settings import Settings
from collector.streams.live import READ_CHUNK_BYTES, open_socket
from tests.processes import collector_env, stream_process, wait_until
from tests.test_end_to_end import DB_KEYS, _db_keys, _ledger_keys
from tests.test_gaps_e2e import _drain_all


def test_the_fake_certificate_is_refused_without_its_ca() -> None:
    """The collector verifies the server: with no CA given, the fake's certificate is refused."""
    with FakeExchange(rate=10, tls=True) as fake:
        url = fake.spot_ws_url + "/stream?streams=btcusdt@aggTrade"
        with pytest.raises(ssl.SSLCertVerificationError):
            asyncio.run(open_socket(url, 10, 1))


def test_one_read_takes_at_most_the_read_chunk_over_tls_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio's TLS transport would read (and decrypt in one loop turn) 256 KiB at a time: the
    collector's sockets offer it READ_CHUNK_BYTES, as the plain transport reads."""
    with FakeExchange(rate=10, tls=True) as fake:
        monkeypatch.setenv("SSL_CERT_FILE", str(fake.tls.ca_file))

        async def read_sizes() -> tuple[int, int, int]:
            tls = await open_socket(fake.spot_ws_url + "/stream?streams=btcusdt@aggTrade", 10, 1)
            with FakeExchange(rate=10) as plain_fake:
                plain = await open_socket(plain_fake.spot_ws_url + "/stream?streams=btcusdt@aggTrade", 10, 1)
                plain_size = plain.transport.max_size  # type: ignore[attr-defined]
                await plain.close()
            # What the socket transport asks of the TLS layer before each recv_into (asyncio.sslproto),
            # and how much it lets pile up while websockets pauses reading.
            tls_size = len(tls.transport._ssl_protocol.get_buffer(-1))  # type: ignore[attr-defined]
            _, tls_high = tls.transport.get_read_buffer_limits()  # type: ignore[attr-defined]
            await tls.close()
            return tls_size, tls_high, plain_size

        assert asyncio.run(read_sizes()) == (READ_CHUNK_BYTES, READ_CHUNK_BYTES, READ_CHUNK_BYTES)


def test_the_collector_records_spot_and_futures_over_wss(settings: Settings, tmp_path: Path) -> None:
    """With SSL_CERT_FILE and REQUESTS_CA_BUNDLE naming the fake's CA, `collector streams` resolves
    the symbols over https (exchangeInfo), records both markets over wss://, and every event sent is
    stored once."""
    init_db(settings)
    client = redis.Redis.from_url(settings.redis_url)
    with FakeExchange(rate=200, tls=True, seed=5) as fake:
        env = collector_env(
            settings,
            fake,
            SPOT_SYMBOLS="ALL",  # exchangeInfo over https at start: requests must trust the CA too
            FUTURES_SYMBOLS="ALL",
            **fake.tls.client_env(),
        )
        assert fake.spot_ws_url.startswith("wss://") and fake.spot_rest_url.startswith("https://")
        streams = stream_process(env, tmp_path)
        try:

            def connected() -> list[str]:
                records = [orjson.loads(v) for v in client.hgetall(keys.CONNECTIONS).values()]
                return [r["url"] for r in records if r["state"] == "connected"]

            wait_until(lambda: len(connected()) == 3, 60, "three connections over wss://")
            assert all(url.startswith("wss://") for url in connected())
            wait_until(lambda: len(fake.ledger()["agg_trades"]) > 600, 60, "traffic")
            fake.pause()
        finally:
            assert streams.stop() == 0, streams.log()[-3000:]
        ledger = fake.ledger()
    _drain_all(settings)
    for table in DB_KEYS:
        assert sorted(_db_keys(settings, table)) == sorted(_ledger_keys(ledger, table)), table
    assert {row[0] for row in _db_keys(settings, "agg_trades")} == {"spot", "futures"}
    assert _db_keys(settings, "mark_prices")
