"""InforIonSim behaves like the Infor ION API Gateway and its authorization server."""

from __future__ import annotations

import urllib.parse

import aiohttp
import pytest

from broker.sandbox import InforIonSim


async def post_token(
    http: aiohttp.ClientSession, ion: InforIonSim, form, path="token.oauth2", **kw
):
    async with http.post(f"{ion.url}/{ion.tenant}/as/{path}", data=form, **kw) as response:
        return response.status, await response.json(
            content_type=None
        ) if await response.read() else None


def refresh_form(ion_form, refresh):
    return ion_form | {"grant_type": "refresh_token", "refresh_token": refresh}


class TestInforIonSimAuthorizationServer:
    async def test_password_grant_with_service_account_keys(self, ion, http, ion_form) -> None:
        """saak/sask as username/password → access_token, token_type, expires_in 7200, refresh."""
        status, body = await post_token(http, ion, ion_form)
        assert status == 200
        assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}
        assert (body["token_type"], body["expires_in"]) == ("Bearer", 7200)

    async def test_client_in_basic_auth(self, ion, http, ion_form, basic) -> None:
        """Client credentials may come as HTTP Basic instead of the body (form-encoded or not)."""
        form = {k: v for k, v in ion_form.items() if not k.startswith("client_")}
        status, _ = await post_token(
            http, ion, form, headers=basic(ion.client_id, ion.client_secret)
        )
        assert status == 200
        encoded = basic(
            urllib.parse.quote_plus(ion.client_id), urllib.parse.quote_plus(ion.client_secret)
        )
        assert (await post_token(http, ion, form, headers=encoded))[0] == 200

    async def test_bad_client_and_bad_keys(self, ion, http, ion_form) -> None:
        """Bad client → 401 invalid_client; bad saak/sask → 400 invalid_grant."""
        status, body = await post_token(http, ion, ion_form | {"client_secret": "x"})
        assert (status, body["error"]) == (401, "invalid_client")
        status, body = await post_token(http, ion, ion_form | {"password": "x"})
        assert (status, body["error"]) == (400, "invalid_grant")
        status, body = await post_token(http, ion, ion_form | {"grant_type": "implicit"})
        assert (status, body["error"]) == (400, "unsupported_grant_type")

    async def test_rotation_kills_the_old_refresh_token(self, ion, http, ion_form, basic) -> None:
        """Each refresh returns a new refresh token; reusing the old one → 400 invalid_grant."""
        _, first = await post_token(http, ion, ion_form)
        client = basic(ion.client_id, ion.client_secret)
        form = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
        status, second = await post_token(http, ion, form, headers=client)
        assert status == 200 and second["refresh_token"] != first["refresh_token"]
        status, body = await post_token(http, ion, form, headers=client)
        assert (status, body["error"]) == (400, "invalid_grant")
        status, _ = await post_token(
            http, ion, form | {"refresh_token": second["refresh_token"]}, headers=client
        )
        assert status == 200
        assert ion.count_token_requests("refresh_token") == 3

    async def test_without_rotation_the_refresh_token_stays(self, http, ion_form) -> None:
        """With rotate_refresh False the same refresh token comes back and keeps working."""
        async with InforIonSim(rotate_refresh=False) as ion:
            _, first = await post_token(http, ion, ion_form)
            for _ in range(2):
                status, body = await post_token(
                    http, ion, refresh_form(ion_form, first["refresh_token"])
                )
                assert status == 200 and body["refresh_token"] == first["refresh_token"]

    async def test_no_refresh_token_unless_issued(self, http, ion_form) -> None:
        """An app without "Issue Refresh Token" gets no refresh_token."""
        async with InforIonSim(issue_refresh=False) as ion:
            status, body = await post_token(http, ion, ion_form)
        assert status == 200 and "refresh_token" not in body

    async def test_revoke_ends_the_grant(self, ion, http, ion_form, basic) -> None:
        """Revoking a refresh token → 200, grant "revoke"; its refresh and access tokens die."""
        _, grant = await post_token(http, ion, ion_form)
        _, other = await post_token(http, ion, ion_form)
        form = {"token": grant["refresh_token"], "token_type_hint": "refresh_token"}
        status, _ = await post_token(
            http, ion, form, "revoke_token.oauth2", headers=basic(ion.client_id, ion.client_secret)
        )
        assert status == 200
        assert ion.revocations == [grant["refresh_token"]]
        assert ion.count_token_requests("revoke") == 1
        assert (await post_token(http, ion, refresh_form(ion_form, grant["refresh_token"])))[
            0
        ] == 400
        me = f"{ion.url}/{ion.tenant}/ifsservice/usermgt/v2/users/me"
        async with http.get(
            me, headers={"Authorization": f"Bearer {grant['access_token']}"}
        ) as response:
            assert response.status == 401
        async with http.get(
            me, headers={"Authorization": f"Bearer {other['access_token']}"}
        ) as response:
            assert response.status == 200

    async def test_revoke_needs_the_client(self, ion, http) -> None:
        """Revocation without valid client credentials → 401 invalid_client."""
        status, body = await post_token(http, ion, {"token": "x"}, "revoke_token.oauth2")
        assert (status, body["error"]) == (401, "invalid_client")

    async def test_ionapi_points_at_the_simulator(self, ion) -> None:
        """ionapi() is a realistic .ionapi whose pu + ot is the token endpoint."""
        doc = ion.ionapi()
        assert {
            "ti",
            "cn",
            "dt",
            "ci",
            "cs",
            "iu",
            "pu",
            "oa",
            "ot",
            "or",
            "ev",
            "v",
            "sc",
            "ru",
            "saak",
            "sask",
        } <= set(doc)
        assert doc["iu"] == ion.url and doc["pu"] == f"{ion.url}/ACME_TST/as/"
        assert urllib.parse.urljoin(doc["pu"], doc["ot"]) == f"{ion.url}/ACME_TST/as/token.oauth2"
        assert doc["or"] == "revoke_token.oauth2"
        upper = ion.ionapi(upper_keys=True, pu_trailing_slash=False)
        assert (upper["SAAK"], upper["SASK"]) == (ion.saak, ion.sask) and "saak" not in upper
        assert upper["pu"] == f"{ion.url}/ACME_TST/as"

    def test_ionapi_needs_a_started_simulator(self) -> None:
        """Before start() there is no URL to put in the file."""
        with pytest.raises(RuntimeError, match="start"):
            InforIonSim().ionapi()


class TestInforIonSimGateway:
    async def test_users_me_and_m3(self, ion, http, login) -> None:
        """users/me and M3 execute answer JSON with a valid Bearer token."""
        headers = await login(ion)
        async with http.get(
            f"{ion.url}/ACME_TST/ifsservice/usermgt/v2/users/me", headers=headers
        ) as response:
            assert (await response.json())["response"]["userlist"][0]["userName"] == ion.saak
        url = f"{ion.url}/ACME_TST/M3/m3api-rest/v2/execute/CRS610MI/LstByNumber?maxrecs=2"
        async with http.get(url, headers=headers) as response:
            body = await response.json()
        assert (
            body["results"][0]["transaction"] == "LstByNumber"
            and body["nrOfFailedTransactions"] == 0
        )

    async def test_missing_invalid_or_expired_token_is_401(self, ion, http, login, clock) -> None:
        """The gateway answers 401 with a Bearer challenge for no, forged or expired tokens."""
        url = f"{ion.url}/ACME_TST/ifsservice/usermgt/v2/users/me"
        ion.clock = clock
        headers = await login(ion)
        clock.advance(7200)
        for sent in ({}, {"Authorization": "Bearer forged"}, headers):
            async with http.get(url, headers=sent) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"].startswith("Bearer")

    async def test_unknown_api_is_404_and_wrong_tenant_too(self, ion, http, login) -> None:
        """An unknown path under the tenant with a valid token → 404; another tenant → 404."""
        headers = await login(ion)
        async with http.get(f"{ion.url}/ACME_TST/LN/nothing", headers=headers) as response:
            assert response.status == 404
        async with http.get(
            f"{ion.url}/OTHER/M3/m3api-rest/v2/execute/A/B", headers=headers
        ) as response:
            assert response.status == 404

    async def test_forbidden_paths_are_403_even_with_a_valid_token(self, ion, http, login) -> None:
        """A path under forbidden_paths → 403 (scope missing), which a refresh cannot fix."""
        headers = await login(ion)
        ion.forbidden_paths = {"/ACME_TST/M3"}
        async with http.get(
            f"{ion.url}/ACME_TST/M3/m3api-rest/v2/execute/A/B", headers=headers
        ) as response:
            assert response.status == 403
            assert (await response.json())["error"] == "insufficient_scope"
        async with http.get(
            f"{ion.url}/ACME_TST/ifsservice/usermgt/v2/users/me", headers=headers
        ) as response:
            assert response.status == 200

    async def test_quota_answers_429_with_retry_after(self, ion, http, login, clock) -> None:
        """Beyond quota=(n, seconds) calls get 429 + Retry-After until the window frees a slot."""
        headers = await login(ion)
        ion.clock = clock
        ion.quota = (2, 60.0)
        url = f"{ion.url}/ACME_TST/ifsservice/usermgt/v2/users/me"
        statuses = []
        for _ in range(3):
            async with http.get(url, headers=headers) as response:
                statuses.append((response.status, response.headers.get("Retry-After")))
            clock.advance(10)
        assert statuses == [(200, None), (200, None), (429, "40")]
        ion.quota_retry_after = False
        async with http.get(url, headers=headers) as response:
            assert (response.status, response.headers.get("Retry-After")) == (429, None)
        clock.advance(30)
        async with http.get(url, headers=headers) as response:
            assert response.status == 200

    async def test_queued_429_and_504(self, ion, http, login) -> None:
        """Queued gateway answers (429 with Retry-After, 504) come before the handler."""
        headers = await login(ion)
        ion.queue_api_response(429, headers={"Retry-After": "3"})
        ion.queue_api_response(504, body={"error": "gateway timeout"})
        url = f"{ion.url}/ACME_TST/M3/m3api-rest/v2/execute/A/B"
        async with http.post(url, headers=headers, data=b"{}") as response:
            assert (response.status, response.headers["Retry-After"]) == (429, "3")
        async with http.post(url, headers=headers, data=b"{}") as response:
            assert response.status == 504
        async with http.post(url, headers=headers, data=b"{}") as response:
            assert response.status == 200
