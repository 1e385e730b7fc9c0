"""`credentials_expire`: the date the service account's password or client secret expires,
exported as erp_broker_credentials_expiry_timestamp_seconds and shown in /connectors and
`erp-broker status` (the alert rules on it are tested in tests/ops/test_alert_rules.py)."""

from __future__ import annotations

import datetime
from typing import Any

import aiohttp
import pytest

from broker.commands import status
from broker.config import parse_config
from broker.errors import ConfigError
from broker.sandbox import IfsApps10Sim

from .conftest import BrokerFactory, ifs_connector, metric, offline_pso_connector

EXPIRY = "erp_broker_credentials_expiry_timestamp_seconds"
JAN_31 = datetime.datetime(2027, 1, 31, tzinfo=datetime.UTC).timestamp()


class TestCredentialsExpire:
    async def test_exported_and_shown(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The date becomes the gauge (UTC midnight), /connectors shows it, and `status` shows
        it in its own column."""
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file, credentials_expire="2027-01-31")}
        )
        assert metric(server, EXPIRY, connector="ifs") == JAN_31
        async with http.get(f"{server.admin_url}/metrics") as resp:
            assert f'{EXPIRY}{{connector="ifs"}} ' in await resp.text()
        async with http.get(f"{server.admin_url}/connectors") as resp:
            assert (await resp.json())["ifs"]["credentials_expire"] == "2027-01-31"
        config = parse_config(
            {
                "admin_listen": server.admin_url.removeprefix("http://"),
                "connectors": {"ifs": ifs_connector(ifs_sim, ca_file)},
            }
        )
        await server.broker.wait_ready(15)  # `status` exits 0 only once the token is there
        capsys.readouterr()
        assert await status(config, "table") == 0
        lines = capsys.readouterr().out.splitlines()
        header, row = lines[
            lines.index(next(line for line in lines if line.startswith("CONNECTOR"))) :
        ][:2]
        assert "CREDENTIALS EXPIRE" in header
        assert "2027-01-31 (" in row and "d" in row.split("2027-01-31 (")[1]

    async def test_absent_means_no_series(
        self,
        ifs_sim: IfsApps10Sim,
        ca_file: str,
        make_broker: BrokerFactory,
        http: aiohttp.ClientSession,
    ) -> None:
        """Without credentials_expire there is no series (an alert cannot fire on a 0), and
        /connectors says null."""
        server = await make_broker({"ifs": ifs_connector(ifs_sim, ca_file)})
        assert server.broker.metrics.registry.get_sample_value(EXPIRY, {"connector": "ifs"}) is None
        async with http.get(f"{server.admin_url}/connectors/ifs") as resp:
            assert (await resp.json())["credentials_expire"] is None

    async def test_rotated_credentials_bring_their_new_date(
        self, ifs_sim: IfsApps10Sim, ca_file: str, make_broker: BrokerFactory
    ) -> None:
        """A rotated password picked up at run time brings its own credentials_expire."""
        server = await make_broker(
            {"ifs": ifs_connector(ifs_sim, ca_file, credentials_expire="2027-01-31")}
        )
        rotated = parse_config(
            {
                "connectors": {
                    "ifs": ifs_connector(
                        ifs_sim, ca_file, password="new", credentials_expire="2027-07-31"
                    )
                }
            }
        )
        assert server.broker.connectors["ifs"].update_credentials(rotated.connectors["ifs"])
        assert (
            metric(server, EXPIRY, connector="ifs")
            == datetime.datetime(2027, 7, 31, tzinfo=datetime.UTC).timestamp()
        )

    @pytest.mark.parametrize("value", ["next year", "2027-02-30", 12])
    def test_a_bad_date_is_named(self, value: Any) -> None:
        with pytest.raises(ConfigError) as info:
            parse_config(
                {"connectors": {"p": offline_pso_connector(credentials_expire=value)}},
                "b.yaml",
            )
        assert any(
            line.startswith("b.yaml: connectors.p.credentials_expire: ")
            for line in info.value.problems
        ), info.value.problems
