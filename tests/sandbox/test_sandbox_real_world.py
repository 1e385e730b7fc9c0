"""The simulators' real-world switches: identity providers and ERPs as they really behave."""

from __future__ import annotations

import aiohttp
import pytest

from broker.sandbox import IfsApps10Sim, InforIonSim, PsoSim
from broker.sandbox.ifs_pso import PSO_BASE

from .conftest import FakeClock, Login

TOKEN_PATH = "/auth/realms/ifsapps/protocol/openid-connect/token"
NATIVE_PATH = "/openid-connect-provider/idp/token"
API = "/main/ifsapplications/projection/v1"


async def post(http: aiohttp.ClientSession, url: str, form: dict[str, str], **kw: object):
    async with http.post(url, data=form, **kw) as response:  # type: ignore[arg-type]
        return response.status, await response.json(content_type=None)


def wrong(form: dict[str, str]) -> dict[str, str]:
    return form | {"password": "wrong"}


class TestControlEndpoints:
    async def test_switches_and_clock_are_curlable(self, http, ifs: IfsApps10Sim) -> None:
        """POST /_sandbox/switches sets a switch; POST /_sandbox/clock moves the clock ahead."""
        status, body = await post_json(http, f"{ifs.url}/_sandbox/switches", {"brute_force": True})
        assert (status, body, ifs.brute_force) == (200, {"changed": ["brute_force"]}, True)
        before = ifs.clock()
        status, body = await post_json(http, f"{ifs.url}/_sandbox/clock", {"advance": 86400})
        assert status == 200 and body["clock_offset"] == 86400
        assert ifs.clock() - before >= 86400
        status, _ = await post_json(http, f"{ifs.url}/_sandbox/clock", {"advance": -1})
        assert status == 400


async def post_json(http: aiohttp.ClientSession, url: str, data: object):
    async with http.post(url, json=data) as response:
        return response.status, await response.json(content_type=None)


class TestKeycloakBruteForce:
    async def test_two_quick_failures_lock_even_the_right_password(
        self, http, ifs, ifs_form, clock: FakeClock
    ) -> None:
        """Two failures less than 1 s apart lock the user 60 s; the right password is refused."""
        ifs.clock = clock
        ifs.brute_force = True
        url = ifs.url + TOKEN_PATH
        assert (await post(http, url, wrong(ifs_form)))[0] == 401
        clock.advance(0.5)
        assert (await post(http, url, wrong(ifs_form)))[0] == 401
        status, body = await post(http, url, ifs_form)
        assert (status, body["error_description"]) == (401, "Invalid user credentials")
        assert ifs.locked_refusals == 1 and ifs.state()["locked"] is True
        clock.advance(60)
        assert (await post(http, url, ifs_form))[0] == 200
        assert ifs.login_failures.failures == 0  # a success clears the record

    async def test_spaced_failures_never_lock_until_the_failure_factor(
        self, http, ifs, ifs_form, clock: FakeClock
    ) -> None:
        """Failures 30 s apart do not lock; the 30th locks for 60 s (wait_increment)."""
        ifs.clock = clock
        ifs.brute_force = True
        url = ifs.url + TOKEN_PATH
        for _ in range(29):
            await post(http, url, wrong(ifs_form))
            clock.advance(30)
        assert not ifs.locked()
        await post(http, url, wrong(ifs_form))
        assert ifs.locked() and ifs.login_failures.not_before - clock() == 60

    async def test_permanent_lockout_disables_the_user(
        self, http, ifs, ifs_form, clock: FakeClock
    ) -> None:
        """With permanent_lockout, reaching the failure factor disables the account."""
        ifs.clock = clock
        ifs.brute_force = ifs.permanent_lockout = True
        ifs.failure_factor = 3
        url = ifs.url + TOKEN_PATH
        for _ in range(3):
            await post(http, url, wrong(ifs_form))
            clock.advance(30)
        status, body = await post(http, url, ifs_form)
        assert (status, body["error_description"]) == (400, "Account disabled")


class TestKeycloakStates:
    @pytest.mark.parametrize(
        ("switch", "value", "status", "error", "description"),
        [
            ("user_enabled", False, 400, "invalid_grant", "Account disabled"),
            ("user_set_up", False, 400, "invalid_grant", "Account is not fully set up"),
            (
                "direct_grants",
                False,
                400,
                "unauthorized_client",
                "Client not allowed for direct access grants",
            ),
            ("client_enabled", False, 401, "invalid_client", None),
            ("keycloak_version", "26.6", None, None, None),
        ],
    )
    async def test_states_answer_as_keycloak(
        self, http, ifs, ifs_form, switch, value, status, error, description
    ) -> None:
        """Each user or client state answers Keycloak's status, error and description."""
        setattr(ifs, switch, value)
        if switch == "keycloak_version":  # 26.6 answers bad user credentials with 400
            got, body = await post(http, ifs.url + TOKEN_PATH, wrong(ifs_form))
            assert (got, body["error"]) == (400, "invalid_grant")
            return
        got, body = await post(http, ifs.url + TOKEN_PATH, ifs_form)
        assert (got, body["error"]) == (status, error)
        if description:
            assert body["error_description"] == description

    async def test_client_credentials(self, http, ifs, ifs_form) -> None:
        """client_credentials: an access token, no refresh token; refused without a service
        account."""
        form = {k: ifs_form[k] for k in ("client_id", "client_secret")}
        status, body = await post(
            http, ifs.url + TOKEN_PATH, form | {"grant_type": "client_credentials"}
        )
        assert status == 200 and "refresh_token" not in body and body["expires_in"] == 180
        ifs.service_accounts = False
        status, body = await post(
            http, ifs.url + TOKEN_PATH, form | {"grant_type": "client_credentials"}
        )
        assert (status, body["error"]) == (400, "unauthorized_client")


class TestRevokeRefreshToken:
    async def test_reuse_ends_the_whole_session_and_is_counted(self, http, ifs, ifs_form) -> None:
        """Presenting a used refresh token kills the newest one too, and counts a reuse event."""
        ifs.revoke_refresh_token = True
        url = ifs.url + TOKEN_PATH
        _, first = await post(http, url, ifs_form)
        client = {k: ifs_form[k] for k in ("client_id", "client_secret")}
        refresh = client | {"grant_type": "refresh_token"}
        status, second = await post(http, url, refresh | {"refresh_token": first["refresh_token"]})
        assert status == 200
        status, body = await post(http, url, refresh | {"refresh_token": first["refresh_token"]})
        assert (status, body["error_description"]) == (
            400,
            "Maximum allowed refresh token reuse exceeded",
        )
        assert ifs.refresh_reuse_events == 1
        status, body = await post(http, url, refresh | {"refresh_token": second["refresh_token"]})
        assert (status, body["error_description"]) == (400, "Token is not active")


class TestNativeProvider:
    async def test_resource_required_and_id_token_only(self, http, ifs, ifs_form) -> None:
        """The native provider wants resource=<GUID>; with id_token_only the API takes only the
        ID token as Bearer; expires_in may come as a string."""
        ifs.native_resource = "8d4f-guid"
        ifs.id_token_only = ifs.expires_in_string = True
        url = ifs.url + NATIVE_PATH
        status, body = await post(http, url, ifs_form)
        assert (status, body["error"]) == (400, "invalid_request")
        status, body = await post(http, url, ifs_form | {"resource": "8d4f-guid"})
        assert status == 200 and body["expires_in"] == "180"
        api = f"{ifs.url}{API}/AllProjections.svc/Projections"
        for token, expected in ((body["access_token"], 401), (body["id_token"], 200)):
            async with http.get(api, headers={"Authorization": f"Bearer {token}"}) as response:
                assert response.status == expected


class TestIfsApi:
    async def test_basic_on_the_integration_cluster(self, http, ifs, basic) -> None:
        """/int/ takes HTTP Basic with the user's password; a wrong one is 401."""
        async with http.get(f"{ifs.url}/int/x", headers=basic(ifs.username, ifs.password)) as r:
            assert r.status == 200
        async with http.get(f"{ifs.url}/int/x", headers=basic(ifs.username, "nope")) as r:
            assert r.status == 401

    async def test_mi_modified_error(self, http, ifs, login: Login) -> None:
        """mi_modified_errors=n: the next n OData calls answer 500 MI_MODIFIED_ERROR."""
        headers = await login(ifs)
        ifs.mi_modified_errors = 1
        api = f"{ifs.url}{API}/AllProjections.svc/Projections"
        async with http.get(api, headers=headers) as response:
            assert response.status == 500
            assert (await response.json())["error"]["code"] == "MI_MODIFIED_ERROR"
        async with http.get(api, headers=headers) as response:
            assert response.status == 200


class TestPsoDeadSessions:
    @pytest.mark.parametrize(
        ("style", "status", "body"),
        [
            ("400", 400, {"Message": "AUTHENTICATION_FAILED"}),
            ("200", 200, {"Code": 401, "Message": "INVALID_SESSION"}),
            ("401", 401, {"Message": "Authorization has been denied for this request."}),
        ],
    )
    async def test_styles(self, http, pso: PsoSim, login: Login, style, status, body) -> None:
        """A dead session answers in the configured style."""
        pso.dead_session_style = style
        headers = await login(pso)
        pso.expire_all_tokens()
        async with http.get(f"{pso.url}{PSO_BASE}/resource", headers=headers) as response:
            assert (response.status, await response.json()) == (status, body)

    async def test_idle_timeout(self, http, pso: PsoSim, login: Login, clock: FakeClock) -> None:
        """A session unused for session_idle_timeout seconds dies; used ones live on."""
        pso.clock = clock
        pso.session_idle_timeout = 600
        headers = await login(pso)
        url = f"{pso.url}{PSO_BASE}/resource"
        for _ in range(3):
            clock.advance(500)
            async with http.get(url, headers=headers) as response:
                assert response.status == 200
        clock.advance(600)
        async with http.get(url, headers=headers) as response:
            assert response.status == 401


class TestInfor:
    async def test_idle_grant_dies(
        self, http, ion: InforIonSim, ion_form, clock: FakeClock
    ) -> None:
        """A grant not refreshed for grant_idle_days dies; refreshed in time, it lives on."""
        ion.clock = clock
        url = f"{ion.url}/{ion.tenant}/as/token.oauth2"
        _, body = await post(http, url, ion_form)
        client = {k: ion_form[k] for k in ("client_id", "client_secret")}
        clock.advance(29 * 86400)
        status, body = await post(
            http,
            url,
            client | {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]},
        )
        assert status == 200
        clock.advance(30 * 86400)
        status, _ = await post(
            http,
            url,
            client | {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]},
        )
        assert status == 400 and ion.idle_deaths == 1

    async def test_rotation_period(
        self, http, ion: InforIonSim, ion_form, clock: FakeClock
    ) -> None:
        """With rotation_period the same refresh token comes back until it is that old."""
        ion.clock = clock
        ion.rotation_period = 8 * 3600
        url = f"{ion.url}/{ion.tenant}/as/token.oauth2"
        _, body = await post(http, url, ion_form)
        client = {k: ion_form[k] for k in ("client_id", "client_secret")}
        first = body["refresh_token"]
        _, body = await post(
            http, url, client | {"grant_type": "refresh_token", "refresh_token": first}
        )
        assert body["refresh_token"] == first
        clock.advance(8 * 3600)
        _, body = await post(
            http, url, client | {"grant_type": "refresh_token", "refresh_token": first}
        )
        assert body["refresh_token"] != first

    async def test_smoothing_delays_instead_of_429(
        self, http, ion: InforIonSim, login: Login
    ) -> None:
        """Rate smoothing: over the quota a call waits for room instead of getting 429."""
        ion.quota = (1, 0.3)
        ion.smoothing = True
        headers = await login(ion)
        url = f"{ion.url}/{ion.tenant}/ifsservice/usermgt/v2/users/me"
        for _ in range(3):
            async with http.get(url, headers=headers) as response:
                assert response.status == 200
        assert [r.status for r in ion.api_requests] == [200, 200, 200]

    async def test_429_without_retry_after(self, http, ion: InforIonSim, login: Login) -> None:
        """quota_retry_after=False: 429 comes without Retry-After."""
        ion.quota = (1, 60)
        ion.quota_retry_after = False
        headers = await login(ion)
        url = f"{ion.url}/{ion.tenant}/ifsservice/usermgt/v2/users/me"
        async with http.get(url, headers=headers) as response:
            assert response.status == 200
        async with http.get(url, headers=headers) as response:
            assert response.status == 429 and "Retry-After" not in response.headers
