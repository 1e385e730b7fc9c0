"""A client that leaves before its answer is the client's doing, not the broker's: the request is
counted as 499 (nginx's "client closed request") in ``erp_broker_requests_total`` and the
access log, never as a 5xx that would feed the error-ratio alert. A real broker, a real
simulator, a raw client socket."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from broker.sandbox import IfsApps10Sim

from ..conftest import BrokerFactory, ifs_connector, metric
from .test_server import LIMIT, Client, until


class TestClientGone:
    async def test_leaving_mid_request_is_499(
        self, ifs_sim: IfsApps10Sim, make_broker: BrokerFactory, ca_file: str
    ) -> None:
        """The client closes while the ERP is still answering: the handler stops, the
        access line and the request counter say 499, no 5xx is counted."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        proxy = server.broker.proxy
        assert proxy is not None
        with capture_logs() as logs:
            async with asyncio.timeout(LIMIT * 3):
                client = await Client.connect(server.proxy_port)
                await client.send(b"GET /ifs/_test/slow/30 HTTP/1.1\r\nHost: x\r\n\r\n")
                await until(lambda: proxy.inflight == 1)
                client.close()
                await until(lambda: proxy.inflight == 0)
        lines = [line for line in logs if line["event"] == "request"]
        assert [line["status"] for line in lines] == [499]
        labels = {"connector": "ifs", "method": "GET"}
        assert metric(server, "erp_broker_requests_total", status="499", **labels) == 1
        assert metric(server, "erp_broker_requests_total", status="500", **labels) == 0
