"""The machinery every simulator shares: lifecycle, records, switches, control and test routes."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import ssl

import aiohttp
import pytest
import trustme
import yarl

from broker.sandbox import (
    IfsApps10Sim,
    InforIonSim,
    PsoSim,
    Simulator,
    jwt_claims,
    pattern_chunks,
    pattern_sha256,
    start_all,
)
from broker.sandbox.base import ApiRecord, TokenRecord

ODATA_PATH = "/_test/echo/CustomerInfoSet(CustomerId='10%2F7')?$filter=contains(Name,'a%20b')"


class TestSimulatorLifecycle:
    async def test_start_returns_loopback_url_and_stop_closes_it(
        self, http: aiohttp.ClientSession
    ) -> None:
        """start() binds a free port on 127.0.0.1 and returns the URL; stop() closes the port."""
        sim = PsoSim()
        url = await sim.start()
        assert url == sim.url
        assert yarl.URL(url).host == "127.0.0.1" and yarl.URL(url).port
        async with http.get(f"{url}/_sandbox/state") as response:
            assert response.status == 200
        await sim.stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(f"{url}/_sandbox/state"):
                pass

    async def test_start_twice_is_refused(self) -> None:
        """A started simulator cannot be started again."""
        async with PsoSim() as sim:
            with pytest.raises(RuntimeError, match="already started"):
                await sim.start()

    async def test_tls_start_serves_https_on_localhost(self, http: aiohttp.ClientSession) -> None:
        """With an ssl_context the URL is https://localhost:PORT and a trustme CA verifies it."""
        ca = trustme.CA()
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("localhost").configure_cert(server_ctx)
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        sim = IfsApps10Sim()
        url = await sim.start(ssl_context=server_ctx)
        try:
            assert url.startswith("https://localhost:")
            async with http.get(f"{url}/_sandbox/state", ssl=client_ctx) as response:
                assert (await response.json())["url"] == url
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                async with http.get(f"{url}/_sandbox/state"):
                    pass
        finally:
            await sim.stop()

    async def test_start_all_runs_one_of_each(self, http: aiohttp.ClientSession) -> None:
        """start_all() starts the three simulators on distinct ports; stop() ends them all."""
        sandboxes = await start_all()
        async with sandboxes:
            assert isinstance(sandboxes.ifs, IfsApps10Sim)
            assert isinstance(sandboxes.pso, PsoSim)
            assert isinstance(sandboxes.infor, InforIonSim)
            assert len({s.url for s in sandboxes.all}) == 3
            for sim in sandboxes.all:
                async with http.get(f"{sim.url}/_sandbox/state") as response:
                    assert (await response.json())["simulator"] == type(sim).__name__
        for sim in sandboxes.all:
            with pytest.raises(aiohttp.ClientConnectionError):
                async with http.get(f"{sim.url}/_sandbox/state"):
                    pass


class TestSimulatorRecords:
    async def test_token_request_is_recorded(self, ifs: IfsApps10Sim, login, ifs_form) -> None:
        """Each token call is recorded with its grant, form, headers and answered status."""
        await login(ifs)
        (record,) = ifs.token_requests
        assert isinstance(record, TokenRecord)
        assert record.grant == "password"
        assert record.form == ifs_form
        assert record.headers["Content-Type"] == "application/x-www-form-urlencoded"
        assert record.status == 200
        assert ifs.count_token_requests() == 1
        assert ifs.count_token_requests("password") == 1
        assert ifs.count_token_requests("refresh_token") == 0

    async def test_api_request_is_recorded_raw(
        self, sim: Simulator, login, http: aiohttp.ClientSession
    ) -> None:
        """An API call is recorded with its raw path, repeated headers, body, credential, status."""
        headers = await login(sim)
        credential = next(iter(headers.values())).removeprefix("Bearer ")
        send = [*headers.items(), ("X-Repeat", "one"), ("X-Repeat", "two")]
        url = yarl.URL(sim.url + ODATA_PATH, encoded=True)
        async with http.post(url, headers=send, data=b"payload") as response:
            assert response.status == 200
        (record,) = sim.api_requests
        assert isinstance(record, ApiRecord)
        assert (record.method, record.raw_path) == ("POST", ODATA_PATH)
        assert record.headers.getall("X-Repeat") == ["one", "two"]
        assert record.body == b"payload"
        assert record.body_length == 7
        assert record.credential == credential
        assert record.status == 200

    async def test_recorded_body_is_capped(
        self, pso: PsoSim, login, http: aiohttp.ClientSession
    ) -> None:
        """Only record_body_limit bytes of a body are kept; length and hash cover all of it."""
        pso.record_body_limit = 10
        body = b"x" * 1000
        async with http.put(
            f"{pso.url}/_test/upload", headers=await login(pso), data=body
        ) as response:
            assert await response.json() == {
                "length": 1000,
                "sha256": hashlib.sha256(body).hexdigest(),
            }
        (record,) = pso.api_requests
        assert record.body == b"x" * 10
        assert (record.body_length, record.body_sha256) == (1000, hashlib.sha256(body).hexdigest())

    async def test_wait_for_api_requests_returns_when_reached(
        self, pso: PsoSim, login, http: aiohttp.ClientSession
    ) -> None:
        """wait_for_api_requests blocks until the n-th API call has been answered."""
        headers = await login(pso)
        waiter = asyncio.create_task(pso.wait_for_api_requests(2))
        for _ in range(2):
            async with http.get(f"{pso.url}/_test/echo/x", headers=headers):
                pass
        await waiter
        assert len(pso.api_requests) == 2

    async def test_wait_for_token_requests_filters_by_grant(
        self, ion: InforIonSim, http: aiohttp.ClientSession, ion_form: dict[str, str]
    ) -> None:
        """wait_for_token_requests(n, grant=...) counts only that grant: refresh grants do not
        satisfy a wait for password grants, and the wait ends at the n-th password grant."""
        url = f"{ion.url}/{ion.tenant}/as/token.oauth2"
        waiter = asyncio.create_task(ion.wait_for_token_requests(2, grant="password"))
        async with http.post(url, data=ion_form) as response:
            refresh = (await response.json())["refresh_token"]
        for _ in range(2):  # two refresh grants: four token requests in all, one of them password
            form = ion_form | {"grant_type": "refresh_token", "refresh_token": refresh}
            async with http.post(url, data=form) as response:
                assert response.status == 200
                refresh = (await response.json())["refresh_token"]
        await ion.wait_for_token_requests(3)  # every request so far was recorded ...
        assert not waiter.done()  # ... and the refresh grants did not count as password grants
        async with http.post(url, data=ion_form) as response:
            assert response.status == 200
        await asyncio.wait_for(waiter, 5)
        assert ion.count_token_requests("password") == 2
        assert ion.count_token_requests("refresh_token") == 2

    async def test_wait_times_out_with_a_clear_message(self, pso: PsoSim) -> None:
        """A wait that is not satisfied raises TimeoutError naming what it waited for."""
        with pytest.raises(
            TimeoutError, match=r"PsoSim: waited 0.01 s for 1 token requests .*saw 0"
        ):
            await pso.wait_for_token_requests(1, timeout=0.01, grant="session")
        with pytest.raises(TimeoutError, match="for 3 API requests, saw 0"):
            await pso.wait_for_api_requests(3, timeout=0.01)


class TestSimulatorTokens:
    async def test_tokens_are_jwt_shaped_and_unguessable(self, ifs: IfsApps10Sim, login) -> None:
        """Tokens are header.payload.signature with exp, iat, sub, a random jti; never repeated."""
        first = (await login(ifs))["Authorization"].removeprefix("Bearer ")
        second = (await login(ifs))["Authorization"].removeprefix("Bearer ")
        assert first != second and first.count(".") == 2
        claims, other = jwt_claims(first), jwt_claims(second)
        assert claims["exp"] - claims["iat"] == 180
        assert claims["sub"] == ifs.user_id
        assert claims["jti"] != other["jti"]
        assert first.split(".")[2] != second.split(".")[2]

    async def test_expire_all_tokens_makes_api_calls_401(
        self, sim: Simulator, login, http: aiohttp.ClientSession
    ) -> None:
        """expire_all_tokens() kills every access token/session issued so far, not later ones."""
        old = await login(sim)
        sim.expire_all_tokens()
        async with http.get(f"{sim.url}/_test/echo/", headers=old) as response:
            assert response.status == 401
        async with http.get(f"{sim.url}/_test/echo/", headers=await login(sim)) as response:
            assert response.status == 200

    async def test_missing_or_forged_credential_is_401(
        self, sim: Simulator, http: aiohttp.ClientSession
    ) -> None:
        """Test routes sit behind the simulator's credential check."""
        forged = {"Authorization": "Bearer a.b.c", "apiKey": "a.b.c"}
        for headers in ({}, forged):
            async with http.get(f"{sim.url}/_test/echo/", headers=headers) as response:
                assert response.status == 401
        assert [r.status for r in sim.api_requests] == [401, 401]


class TestSimulatorSwitches:
    async def test_api_queue_answers_before_the_credential_check(
        self, sim: Simulator, http: aiohttp.ClientSession
    ) -> None:
        """Queued API answers come first-in first-out, count times, even without a credential."""
        sim.queue_api_response(503, headers={"Retry-After": "7"}, body="busy", count=2)
        sim.queue_api_response(
            429, headers=[("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")], body={"e": 1}
        )
        seen = []
        for _ in range(4):
            async with http.get(f"{sim.url}/_test/echo/x") as response:
                seen.append(
                    (response.status, response.headers.get("Retry-After"), await response.read())
                )
                if response.status == 429:
                    assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
                    assert response.content_type == "application/json"
        assert seen == [
            (503, "7", b"busy"),
            (503, "7", b"busy"),
            (429, None, b'{"e":1}'),
            (401, None, seen[3][2]),
        ]
        assert [r.status for r in sim.api_requests] == [503, 503, 429, 401]

    async def test_token_queue_replaces_token_answers(
        self, ifs: IfsApps10Sim, http: aiohttp.ClientSession, ifs_form
    ) -> None:
        """Queued token answers (5xx, empty 200, no access_token) come first, then the IdP's."""
        ifs.queue_token_response(503)
        ifs.queue_token_response(200, headers={"Content-Type": "application/json"})
        ifs.queue_token_response(200, body={"token_type": "Bearer"})
        url = f"{ifs.url}/auth/realms/ifsapps/protocol/openid-connect/token"
        bodies = []
        for _ in range(4):
            async with http.post(url, data=ifs_form) as response:
                bodies.append((response.status, await response.read()))
        assert bodies[:3] == [(503, b""), (200, b""), (200, b'{"token_type":"Bearer"}')]
        assert bodies[3][0] == 200 and b"access_token" in bodies[3][1]
        assert [(r.grant, r.status) for r in ifs.token_requests] == [
            ("password", s) for s in (503, 200, 200, 200)
        ]

    async def test_token_delays_hold_the_answer(self, pso: PsoSim, login, clock) -> None:
        """token_delay and a queued delay make the token endpoint slow (a slow IdP)."""
        pso.token_delay = 0.05
        loop = asyncio.get_running_loop()
        started = loop.time()
        await login(pso)
        assert loop.time() - started >= 0.05
        pso.token_delay = 0.0
        pso.queue_token_response(200, body={"SessionToken": "late"}, delay=0.05)
        started = loop.time()
        assert await login(pso) == {"apiKey": "late"}
        assert loop.time() - started >= 0.05

    async def test_client_giving_up_on_a_slow_idp_is_recorded_as_499(self, pso, http) -> None:
        """A token call abandoned during token_delay is still recorded, with status 499."""
        pso.token_delay = 30
        form = {"accountId": pso.account_id, "userName": pso.username, "password": pso.password}
        with pytest.raises(asyncio.TimeoutError):
            timeout = aiohttp.ClientTimeout(total=0.05)
            async with http.post(
                f"{pso.url}/IFSSchedulingRESTfulGateway/api/v1/scheduling/session",
                data=form,
                timeout=timeout,
            ):
                pass
        await pso.wait_for_token_requests(1, grant="session")
        assert pso.token_requests[0].status == 499

    async def test_revoke_refresh_tokens_kills_refresh_only(
        self, ifs: IfsApps10Sim, http: aiohttp.ClientSession, ifs_form
    ) -> None:
        """revoke_refresh_tokens() kills refresh tokens; access tokens keep working."""
        url = f"{ifs.url}/auth/realms/ifsapps/protocol/openid-connect/token"
        async with http.post(url, data=ifs_form) as response:
            tokens = await response.json()
        ifs.revoke_refresh_tokens()
        refresh = ifs_form | {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
        }
        async with http.post(url, data=refresh) as response:
            assert response.status == 400
        bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
        async with http.get(f"{ifs.url}/_test/echo/", headers=bearer) as response:
            assert response.status == 200


class TestSimulatorControlEndpoints:
    async def test_queue_endpoint_queues_api_and_token_answers(
        self, pso: PsoSim, http: aiohttp.ClientSession, login
    ) -> None:
        """POST /_sandbox/queue queues answers for API or token calls, like the methods do."""
        spec = {
            "target": "api",
            "status": 504,
            "headers": {"X-Why": "gw"},
            "body": "timeout",
            "count": 2,
        }
        async with http.post(f"{pso.url}/_sandbox/queue", json=spec) as response:
            assert (await response.json())["queued"] == {"api": 2, "token": 0}
        token_spec = {"target": "token", "status": 200, "body": {"SessionToken": "canned"}}
        async with http.post(f"{pso.url}/_sandbox/queue", json=token_spec) as response:
            assert response.status == 200
        assert await login(pso) == {"apiKey": "canned"}
        for _ in range(2):
            async with http.get(f"{pso.url}/_test/echo/") as response:
                assert (response.status, response.headers["X-Why"], await response.text()) == (
                    504,
                    "gw",
                    "timeout",
                )

    async def test_queue_endpoint_rejects_bad_requests(
        self, pso: PsoSim, http: aiohttp.ClientSession
    ) -> None:
        """A malformed queue request is a 400 that says why; nothing is queued."""
        for spec in (
            {"target": "db", "status": 500},
            {"target": "api"},
            {"target": "api", "status": "x"},
        ):
            async with http.post(f"{pso.url}/_sandbox/queue", json=spec) as response:
                assert response.status == 400
                assert "bad queue request" in (await response.json())["error"]
        assert pso.state()["queued"] == {"api": 0, "token": 0}

    async def test_expire_endpoint(
        self, ion: InforIonSim, http: aiohttp.ClientSession, login
    ) -> None:
        """POST /_sandbox/expire is expire_all_tokens() over HTTP."""
        headers = await login(ion)
        async with http.post(f"{ion.url}/_sandbox/expire") as response:
            assert response.status == 200
        async with http.get(
            f"{ion.url}/ACME_TST/ifsservice/usermgt/v2/users/me", headers=headers
        ) as response:
            assert response.status == 401

    async def test_revoke_refresh_endpoint(
        self, ion: InforIonSim, http: aiohttp.ClientSession, ion_form
    ) -> None:
        """POST /_sandbox/revoke-refresh is revoke_refresh_tokens() over HTTP."""
        url = f"{ion.url}/ACME_TST/as/token.oauth2"
        async with http.post(url, data=ion_form) as response:
            refresh = (await response.json())["refresh_token"]
        async with http.post(f"{ion.url}/_sandbox/revoke-refresh") as response:
            assert response.status == 200
        form = ion_form | {"grant_type": "refresh_token", "refresh_token": refresh}
        async with http.post(url, data=form) as response:
            assert response.status == 400

    async def test_credentials_endpoint_changes_settable_attributes(
        self, ifs: IfsApps10Sim, http: aiohttp.ClientSession, ifs_form
    ) -> None:
        """POST /_sandbox/credentials sets credentials; old ones are then rejected."""
        async with http.post(
            f"{ifs.url}/_sandbox/credentials", json={"password": "new", "token_delay": 0}
        ) as response:
            assert await response.json() == {"changed": ["password", "token_delay"]}
        assert ifs.password == "new"
        async with http.post(
            f"{ifs.url}/auth/realms/ifsapps/protocol/openid-connect/token", data=ifs_form
        ) as response:
            assert response.status == 401

    async def test_credentials_endpoint_rejects_unknown_or_mistyped(
        self, ion: InforIonSim, http: aiohttp.ClientSession
    ) -> None:
        """Unknown attributes and wrong types are a 400; nothing changes (all or nothing)."""
        for changes in (
            {"sask": "ok", "url": "x"},
            {"sask": "ok", "rotate_refresh": "yes"},
            ["sask"],
        ):
            async with http.post(f"{ion.url}/_sandbox/credentials", json=changes) as response:
                assert response.status == 400
        assert ion.sask == "ion-sask-secret"
        changes = {"quota": [5, 60], "forbidden_paths": ["/ACME_TST/M3"]}
        async with http.post(f"{ion.url}/_sandbox/credentials", json=changes) as response:
            assert response.status == 200
        assert (ion.quota, ion.forbidden_paths) == ((5, 60.0), {"/ACME_TST/M3"})

    async def test_state_endpoint_counts(
        self, ion: InforIonSim, http: aiohttp.ClientSession, login
    ) -> None:
        """GET /_sandbox/state counts token requests by grant, API requests and revocations."""
        headers = await login(ion)
        await login(ion)
        async with http.get(f"{ion.url}/_test/echo/", headers=headers):
            pass
        async with http.get(f"{ion.url}/_test/echo/"):
            pass
        ion.revoke("some-token")
        async with http.get(f"{ion.url}/_sandbox/state") as response:
            state = await response.json()
        assert state["token_requests"] == {"password": 2}
        assert state["token_requests_total"] == 2
        assert state["api_requests"] == 2
        assert state["api_statuses"] == {"200": 1, "401": 1}
        assert state["revocations"] == 1
        assert len(ion.api_requests) == 2  # control calls are not recorded


class TestSimulatorTestRoutes:
    async def test_echo_keeps_the_raw_path_and_headers(
        self, sim: Simulator, login, http: aiohttp.ClientSession
    ) -> None:
        """/_test/echo reports the raw path byte for byte and all headers in order, repeats kept."""
        headers = await login(sim)
        send = [*headers.items(), ("X-Multi", "1"), ("X-Other", "z"), ("X-Multi", "2")]
        url = yarl.URL(sim.url + ODATA_PATH, encoded=True)
        async with http.request("PATCH", url, headers=send, data=b"abc") as response:
            echo = await response.json()
        assert echo["method"] == "PATCH"
        assert echo["raw_path"] == ODATA_PATH
        names = [name for name, _ in echo["headers"]]
        assert [v for k, v in echo["headers"] if k == "X-Multi"] == ["1", "2"]
        assert names.index("X-Multi") < names.index("X-Other")
        assert echo["body_length"] == 3
        assert echo["body_sha256"] == hashlib.sha256(b"abc").hexdigest()
        assert echo["credential"] == next(iter(headers.values())).removeprefix("Bearer ")

    async def test_echo_keeps_a_literal_space_query(
        self, ifs: IfsApps10Sim, login, http: aiohttp.ClientSession
    ) -> None:
        """Characters a client might re-encode (quotes, $, %2F, '+') come back untouched."""
        raw = (
            "/_test/echo/CustomerInfoSet(CustomerId='10%2F7')"
            "?$filter=contains(Name,'a+b')&$select=Name"
        )
        async with http.get(
            yarl.URL(ifs.url + raw, encoded=True), headers=await login(ifs)
        ) as response:
            assert (await response.json())["raw_path"] == raw

    async def test_gzip_is_sent_compressed(self, sim: Simulator, login) -> None:
        """/_test/gzip sends a gzip body with Content-Encoding: gzip and the plain body's hash."""
        headers = await login(sim)
        async with aiohttp.ClientSession(auto_decompress=False) as raw_client:
            async with raw_client.get(f"{sim.url}/_test/gzip", headers=headers) as response:
                compressed = await response.read()
                assert response.headers["Content-Encoding"] == "gzip"
                assert (
                    response.headers["X-Compressed-SHA256"]
                    == hashlib.sha256(compressed).hexdigest()
                )
                plain = gzip.decompress(compressed)
                assert (
                    response.headers["X-Uncompressed-SHA256"] == hashlib.sha256(plain).hexdigest()
                )
        assert b'"compressed":true' in plain

    async def test_bytes_and_chunked_stream_the_pattern(
        self, pso: PsoSim, login, http: aiohttp.ClientSession
    ) -> None:
        """/_test/bytes/n has Content-Length; /_test/chunked/n is chunked; both send the pattern."""
        headers = await login(pso)
        n = 3 * 64 * 1024 + 5
        async with http.get(f"{pso.url}/_test/bytes/{n}", headers=headers) as response:
            assert response.headers["Content-Length"] == str(n)
            body = await response.read()
        assert hashlib.sha256(body).hexdigest() == pattern_sha256(n)
        assert (
            body[:3] == b"\x00\x01\x02" and body[256] == 0 and body == b"".join(pattern_chunks(n))
        )
        async with http.get(f"{pso.url}/_test/chunked/{n}", headers=headers) as response:
            assert "Content-Length" not in response.headers
            assert response.headers["Transfer-Encoding"] == "chunked"
            assert await response.read() == body
        async with http.get(f"{pso.url}/_test/bytes/-1", headers=headers) as response:
            assert response.status == 400

    async def test_upload_hashes_the_streamed_body(
        self, ion: InforIonSim, login, http: aiohttp.ClientSession
    ) -> None:
        """/_test/upload answers the length and SHA-256 of a body it read chunk by chunk."""
        headers = await login(ion)
        n = 1024 * 1024 + 3

        async def body():
            for chunk in pattern_chunks(n):
                yield chunk

        async with http.post(f"{ion.url}/_test/upload", headers=headers, data=body()) as response:
            assert await response.json() == {"length": n, "sha256": pattern_sha256(n)}
        assert len(ion.api_requests[0].body) == ion.record_body_limit

    async def test_cookies_redirect_and_slow(
        self, ifs: IfsApps10Sim, login, http: aiohttp.ClientSession
    ) -> None:
        """/_test/cookies sets two cookies, /_test/redirect is a 302, /_test/slow sleeps."""
        headers = await login(ifs)
        async with http.get(f"{ifs.url}/_test/cookies", headers=headers) as response:
            assert len(response.headers.getall("Set-Cookie")) == 2
        async with http.get(
            f"{ifs.url}/_test/redirect", headers=headers, allow_redirects=False
        ) as response:
            assert (response.status, response.headers["Location"]) == (302, "/elsewhere")
        async with http.get(f"{ifs.url}/_test/slow/0.01", headers=headers) as response:
            assert await response.json() == {"slept": 0.01}
        async with http.get(f"{ifs.url}/_test/slow/nan", headers=headers) as response:
            assert response.status == 400

    async def test_ion_serves_test_routes_under_the_tenant_too(
        self, ion: InforIonSim, login, http: aiohttp.ClientSession
    ) -> None:
        """Infor's test routes also live under /<tenant>/, where tenant_in_path forwards them."""
        async with http.get(
            f"{ion.url}/ACME_TST/_test/echo/a?b=1", headers=await login(ion)
        ) as response:
            assert (await response.json())["raw_path"] == "/ACME_TST/_test/echo/a?b=1"

    async def test_client_hanging_up_on_slow_is_recorded_as_499(self, pso, login, http) -> None:
        """A client that gives up on /_test/slow ends the handler; the call is recorded as 499."""
        headers = await login(pso)
        with pytest.raises(asyncio.TimeoutError):
            timeout = aiohttp.ClientTimeout(total=0.05)
            async with http.get(f"{pso.url}/_test/slow/60", headers=headers, timeout=timeout):
                pass
        await pso.wait_for_api_requests(1)
        assert pso.api_requests[0].status == 499
