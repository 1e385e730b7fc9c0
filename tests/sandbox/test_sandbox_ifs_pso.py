"""PsoSim behaves like the IFS PSO Scheduling RESTful Gateway per erp-protocols.md."""

from __future__ import annotations

import aiohttp
import pytest

from broker.sandbox import PsoSim, jwt_claims
from broker.sandbox.ifs_pso import PSO_BASE


@pytest.fixture
def pso_form(pso):
    return {"accountId": pso.account_id, "userName": pso.username, "password": pso.password}


async def login_status(
    http: aiohttp.ClientSession, pso: PsoSim, form: dict[str, str], query: str = ""
):
    async with http.post(f"{pso.url}{PSO_BASE}/session{query}", data=form) as response:
        return response.status, await response.json()


class TestPsoSim:
    async def test_login_answers_a_session_token(self, pso, http, pso_form) -> None:
        """A form login with accountId/userName/password → 200 {"SessionToken"}, nothing else."""
        status, body = await login_status(http, pso, pso_form)
        assert status == 200 and list(body) == ["SessionToken"]
        assert "exp" not in jwt_claims(body["SessionToken"])  # PSO gives no lifetime
        (record,) = pso.token_requests
        assert (record.grant, record.form, record.status) == ("session", pso_form, 200)

    @pytest.mark.parametrize(
        "change",
        [{"password": "wrong"}, {"accountId": "OTHER"}, {"userName": "someone"}],
        ids=["password", "account", "user"],
    )
    async def test_bad_credentials_are_400_authentication_failed(
        self, pso, http, pso_form, change
    ) -> None:
        """A wrong password, account id or user → 400 {"Message": "AUTHENTICATION_FAILED"}."""
        assert await login_status(http, pso, pso_form | change) == (
            400,
            {"Message": "AUTHENTICATION_FAILED"},
        )

    async def test_field_names_are_exact_camel_case(self, pso, http, pso_form) -> None:
        """accountid / username (wrong case) are not the fields PSO reads: authentication fails."""
        form = {"accountid": pso.account_id, "username": pso.username, "password": pso.password}
        assert await login_status(http, pso, form) == (400, {"Message": "AUTHENTICATION_FAILED"})
        async with http.post(f"{pso.url}{PSO_BASE}/session", json=pso_form) as response:
            assert response.status == 400  # a JSON body is not the documented form

    async def test_credentials_in_the_query_string_are_refused(self, pso, http, pso_form) -> None:
        """Since 6.11 credentials in the query string are refused, even when correct."""
        query = f"?accountId={pso.account_id}&userName={pso.username}&password={pso.password}"
        status, body = await login_status(http, pso, pso_form, query)
        assert status == 400 and body["Message"] != "AUTHENTICATION_FAILED"

    async def test_session_check_uses_the_api_key_header(self, pso, http, login) -> None:
        """GET …/session with apiKey (any header case) → 200 while it lives, 401 otherwise."""
        token = (await login(pso))["apiKey"]
        for name in ("apiKey", "APIKEY", "apikey"):
            async with http.get(f"{pso.url}{PSO_BASE}/session", headers={name: token}) as response:
                assert response.status == 200
        async with http.get(f"{pso.url}{PSO_BASE}/session", headers={"apiKey": "nope"}) as response:
            assert response.status == 401
        async with http.get(
            f"{pso.url}{PSO_BASE}/session", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert response.status == 401  # PSO reads apiKey, not Bearer

    async def test_data_calls_need_a_live_session(self, pso, http, login) -> None:
        """Data calls without a valid apiKey → 401 with ASP.NET's message; expired sessions too."""
        headers = await login(pso)
        calls = [("GET", "data"), ("POST", "data"), ("GET", "resource"), ("POST", "appointment")]
        for method, path in calls:
            async with http.request(method, f"{pso.url}{PSO_BASE}/{path}", json={}) as response:
                assert response.status == 401
                assert await response.json() == {
                    "Message": "Authorization has been denied for this request."
                }
            async with http.request(
                method, f"{pso.url}{PSO_BASE}/{path}", headers=headers, json={}
            ) as response:
                assert response.status == 200
                assert "dsScheduleData" in await response.json()
        pso.expire_all_tokens()
        async with http.get(f"{pso.url}{PSO_BASE}/data", headers=headers) as response:
            assert response.status == 401

    async def test_data_post_is_echoed_inside_ds_schedule_data(self, pso, http, login) -> None:
        """POST …/data answers a dsScheduleData document carrying what was posted."""
        posted = {"dsScheduleData": {"Activity": [{"id": "A1"}]}}
        async with http.post(
            f"{pso.url}{PSO_BASE}/data", headers=await login(pso), json=posted
        ) as response:
            body = await response.json()
        assert body["dsScheduleData"]["Received"] == posted["dsScheduleData"]

    async def test_sessions_never_expire_by_default(self, pso, http, login, clock) -> None:
        """Without session_lifetime a session lives until expired or logged out."""
        pso.clock = clock
        headers = await login(pso)
        clock.advance(365 * 86400)
        async with http.get(f"{pso.url}{PSO_BASE}/session", headers=headers) as response:
            assert response.status == 200

    async def test_session_lifetime_expires_sessions(self, http, login, clock) -> None:
        """With session_lifetime a session dies that many seconds after login (→ 401)."""
        async with PsoSim(session_lifetime=600) as pso:
            pso.clock = clock
            headers = await login(pso)
            clock.advance(599)
            async with http.get(f"{pso.url}{PSO_BASE}/data", headers=headers) as response:
                assert response.status == 200
            clock.advance(1)
            async with http.get(f"{pso.url}{PSO_BASE}/data", headers=headers) as response:
                assert response.status == 401

    async def test_logout_ends_the_session(self, pso, http, login) -> None:
        """DELETE …/session with apiKey ends it (grant "logout"); the token stops working."""
        headers = await login(pso)
        async with http.delete(f"{pso.url}{PSO_BASE}/session", headers=headers) as response:
            assert response.status == 200
        async with http.get(f"{pso.url}{PSO_BASE}/session", headers=headers) as response:
            assert response.status == 401
        assert pso.revocations == [headers["apiKey"]]
        assert [r.grant for r in pso.token_requests] == ["session", "logout"]
