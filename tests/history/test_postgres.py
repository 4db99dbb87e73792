"""The event store on PostgreSQL, shared by two daemons (each with its own outbox): both write, either
answers a query (and a replay) for the other's events; while PostgreSQL cannot be reached, a daemon keeps
accepting, spools what it took in its outbox's database, says so in /metrics and ships it all once the
server is back."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.history.support import admin, all_events, batch_of, consumer, publish_batch, start, wait_replay, wait_stored
from tests.push.clients import metric
from tests.support.postgres import PG_PORT, fresh_database
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.timeout(150)

DSN_ENV = "MEDIATOR_TEST_STORE_DSN"


async def spooled(http: aiohttp.ClientSession, port: int) -> tuple[float, float]:
    base = f"http://127.0.0.1:{port}"
    return (
        await metric(http, base, "mediator_store_spooled_events"),
        await metric(http, base, "mediator_store_connected"),
    )


async def test_two_daemons_share_one_postgresql_store_and_ship_what_they_spooled_during_an_outage(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int], postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = {"backend": "postgresql", "dsn_env": DSN_ENV, "retention": "1h"}
    async with fresh_database("mediator_store") as dsn:
        proxy = TcpProxy(PG_PORT)
        await proxy.start()
        monkeypatch.setenv(DSN_ENV, dsn.replace(f":{PG_PORT}/", f":{proxy.port}/"))  # A's way to the server
        qa, a = start(tmp_path, "a", overrides={"store": store})
        await a.start()
        monkeypatch.setenv(DSN_ENV, dsn)
        qb, b = start(tmp_path, "b", overrides={"store": store})
        await b.start()
        try:
            async with aiohttp.ClientSession() as http:
                kind = f"com.example.pg.{qa.uid}"
                await publish_batch(http, qa.http_port, batch_of(["/pg/a"], 20, kind))
                await publish_batch(http, qb.http_port, batch_of(["/pg/b"], 20, kind, first=100))
                # either answers for the other's events
                await wait_stored(http, qb.http_port, 20, source="/pg/a")
                await wait_stored(http, qa.http_port, 20, source="/pg/b")
                both = await all_events(http, qa.http_port, type=kind, order="oldest", limit="7")
                assert sorted(e["event"]["data"]["n"] for e in both) == [*range(20), *range(100, 120)]
                one = await admin(http, qa.http_port, "GET", f"events/{kind}-105")
                assert (one["event"]["source"], one["inbound"]) == ("/pg/b", "cloudevents-http")
                matched = await all_events(http, qb.http_port, type=kind, where="data.n % 10 == 3")
                assert sorted(e["event"]["data"]["n"] for e in matched) == [3, 13, 103, 113]

                # A loses PostgreSQL: it accepts and spools, queries answer 503, the metrics say so
                await proxy.stop()
                await publish_batch(http, qa.http_port, batch_of(["/pg/outage"], 30, kind, first=200))
                seen: list[tuple[float, float]] = []

                async def spooling() -> bool:
                    seen.append(await spooled(http, qa.http_port))
                    return seen[-1] == (30.0, 0.0)

                for _ in range(200):
                    if await spooling():
                        break
                else:
                    raise AssertionError(f"A's spool and store readiness: {seen[-3:]}")
                problem = await admin(http, qa.http_port, "GET", "events", want=503)
                assert problem["error"] == "not_ready", problem
                status = await admin(http, qa.http_port, "GET", "status")
                assert status["store"]["error"], status["store"]
                assert status["store"]["spooled"] == 30, status["store"]
                assert status["ready"], "intake and delivery do not depend on the store: /readyz stays ready"

                # back: all of it shipped, B answers for it, and replays it to an AMQP consumer in order
                proxy = TcpProxy(PG_PORT, port=proxy.port)
                await proxy.start()
                await wait_stored(http, qb.http_port, 30, timeout_s=30, source="/pg/outage")
                for _ in range(100):  # shipped means unspooled a moment later (the spool's DELETE commits)
                    if await spooled(http, qa.http_port) == (0.0, 1.0):
                        break
                else:
                    raise AssertionError(
                        f"A's spool and store readiness after the outage: {await spooled(http, qa.http_port)}"
                    )
                key = f"replay.{qa.uid}"
                async with consumer(qb.orders_exchange, key) as amqp:
                    job = await admin(
                        http, qb.http_port, "POST", "replays", want=201,
                        json={"source": "/pg/outage", "since": "10m", "to": f"orders-exchange:{key}"},
                    )  # fmt: skip
                    await wait_replay(http, qb.http_port, job["id"])
                    await amqp.wait_for(30)
                    assert [str(m.message_id) for _, m in amqp.got] == [f"{kind}-{n}" for n in range(200, 230)]
        finally:
            await proxy.stop()
            assert await a.stop() == 0, a.logs()
            assert await b.stop() == 0, b.logs()
