"""Infor ION API simulator: the authorization server (mingle-sso) and the API gateway.

Routes (besides the shared ``/_sandbox/`` and ``/_test/`` ones of :mod:`broker.sandbox.base`;
the ``/_test/`` routes are also served under ``/{tenant}/_test/``, where a broker with
``tenant_in_path`` sends them)::

    POST /{tenant}/as/token.oauth2          password grant (username=saak, password=sask) and
                                            refresh_token grant; client in the form or Basic
    POST /{tenant}/as/revoke_token.oauth2   token (+ token_type_hint), client → 200; recorded
                                            grant "revoke"; a refresh token ends its whole grant
    GET  /{tenant}/ifsservice/usermgt/v2/users/me                 Bearer → the service user
    *    /{tenant}/M3/m3api-rest/v2/execute/{program}/{transaction}  Bearer → M3 result JSON
    *    /{tenant}/{anything else}                                Bearer → 404

Authorization server: bad client 401 ``invalid_client``; bad saak/sask 400 ``invalid_grant``;
dead, reused or unknown refresh token 400 ``invalid_grant``; unknown grant 400
``unsupported_grant_type``. Refresh tokens roll over (``rotate_refresh``): each refresh returns
a new one and kills the old one; with rotation off the same refresh token comes back.

Gateway order of checks: 401 (token missing/invalid/expired) → 429 (``quota``: at most n
accepted calls per window, with ``Retry-After`` unless ``quota_retry_after`` is False) → 403
(``forbidden_paths``: prefixes of the decoded request path, e.g. ``/ACME_TST/M3``). Error bodies
are a guess (Infor documents none).

Switches (constructor arguments, or ``POST /_sandbox/switches``)::

    grant_idle_days      30: a grant whose refresh token was not used for that long dies
                         ("refresh at least every ~25 days"); advance the clock with
                         ``POST /_sandbox/clock`` to see it
    rotation_period      None: rotate on every refresh; seconds (e.g. 28800, "about every
                         8 h"): the same refresh token comes back until it is that old
    quota_retry_after    false: 429 without ``Retry-After`` (Infor documents none)
    smoothing            true: over the quota, calls are delayed until the window has room
                         (spike arrest's rate smoothing) instead of refused
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar

from aiohttp import web

from .base import (
    JSON,
    ApiCall,
    Simulator,
    TokenCall,
    Validator,
    as_bool,
    as_float,
    as_int,
    as_str,
    json_response,
    oauth_error,
    optional,
    token_response,
)

REFRESH = frozenset({"refresh"})


def _quota(value: Any) -> tuple[int, float]:
    if not (isinstance(value, list | tuple) and len(value) == 2):
        raise ValueError("expected [requests, seconds]")
    return as_int(value[0]), float(value[1])


def _paths(value: Any) -> set[str]:
    if not isinstance(value, list | set | tuple):
        raise ValueError("expected a list of path prefixes")
    return {as_str(v) for v in value}


class InforIonSim(Simulator):
    """ION API Gateway and its authorization server for one tenant."""

    settable: ClassVar[Mapping[str, Validator]] = {
        **Simulator.settable,
        "client_id": as_str,
        "client_secret": as_str,
        "saak": as_str,
        "sask": as_str,
        "token_lifetime": as_int,
        "issue_refresh": as_bool,
        "rotate_refresh": as_bool,
        "quota": optional(_quota),
        "quota_retry_after": as_bool,
        "forbidden_paths": _paths,
        "grant_idle_days": as_float,
        "rotation_period": optional(as_float),
        "smoothing": as_bool,
    }

    def __init__(
        self,
        *,
        tenant: str = "ACME_TST",
        client_id: str = "ACME_TST~abc",
        client_secret: str = "ion-client-secret",
        saak: str = "ACME_TST#saak-key",
        sask: str = "ion-sask-secret",
        token_lifetime: int = 7200,
        issue_refresh: bool = True,
        rotate_refresh: bool = True,
        quota: tuple[int, float] | None = None,
        grant_idle_days: float = 30.0,
        rotation_period: float | None = None,
        smoothing: bool = False,
        **switches: Any,
    ) -> None:
        super().__init__()
        self.grant_idle_days = grant_idle_days
        self.rotation_period = rotation_period
        self.smoothing = smoothing
        #: Grant id → when its refresh token was last used (or the grant issued).
        self.grant_used: dict[str, float] = {}
        #: Grants that died of idleness.
        self.idle_deaths = 0
        self.tenant = tenant
        self.client_id = client_id
        self.client_secret = client_secret
        self.saak = saak
        self.sask = sask
        self.token_lifetime = token_lifetime
        self.issue_refresh = issue_refresh
        self.rotate_refresh = rotate_refresh
        #: (requests, seconds): calls beyond that in any window get 429.
        self.quota = quota
        self.quota_retry_after = True
        #: Decoded path prefixes that answer 403 even with a valid token (scope missing).
        self.forbidden_paths: set[str] = set()
        self._accepted: deque[float] = deque()
        self.set_switches(switches)

    def ionapi(self, *, upper_keys: bool = False, pu_trailing_slash: bool = True) -> JSON:
        """A ``.ionapi`` document pointing at this simulator (start it first)."""
        if not self.url:
            raise RuntimeError("start the simulator before asking for its .ionapi")
        pu = f"{self.url}/{self.tenant}/as" + ("/" if pu_trailing_slash else "")
        access_key, secret_key = ("SAAK", "SASK") if upper_keys else ("saak", "sask")
        return {
            "ti": self.tenant,
            "cn": "erp-broker",
            "dt": "12",
            "ci": self.client_id,
            "cs": self.client_secret,
            "iu": self.url,
            "pu": pu,
            "oa": "authorization.oauth2",
            "ot": "token.oauth2",
            "or": "revoke_token.oauth2",
            "ev": "U1723456789",
            "v": "1.1",
            "sc": [],
            "ru": "",
            access_key: self.saak,
            secret_key: self.sask,
        }

    # routes ------------------------------------------------------------------------------

    def test_prefixes(self) -> tuple[str, ...]:
        return ("", f"/{self.tenant}")

    def add_routes(self, router: web.UrlDispatcher) -> None:
        root = f"/{self.tenant}"
        router.add_post(root + "/as/token.oauth2", self.token_route(self._token))
        router.add_post(root + "/as/revoke_token.oauth2", self.token_route(self._revoke, "revoke"))
        router.add_route("GET", root + "/ifsservice/usermgt/v2/users/me", self.api_route(self._me))
        router.add_route(
            "*",
            root + "/M3/m3api-rest/v2/execute/{program}/{transaction}",
            self.api_route(self._m3),
        )
        router.add_route("*", root + "/{tail:.*}", self.api_route(self._not_found))

    def unauthorized(self, request: web.Request, credential: str | None) -> web.Response:
        challenge = 'Bearer realm="Infor ION API"'
        if credential is not None:
            challenge += ', error="invalid_token"'
        return json_response(
            {
                "error": "invalid_token",
                "error_description": "The access token is missing, invalid or expired",
            },
            401,
            {"WWW-Authenticate": challenge},
        )

    def _quota_wait(self) -> float:
        """Seconds until the quota window has room (0: it has room now)."""
        if self.quota is None:
            return 0.0
        limit, window = self.quota
        now = self.clock()
        while self._accepted and self._accepted[0] <= now - window:
            self._accepted.popleft()
        if len(self._accepted) < limit:
            return 0.0
        return max(0.001, self._accepted[len(self._accepted) - limit] + window - now)

    async def pace(self, request: web.Request) -> None:
        if not self.smoothing or self.quota is None:
            return
        # The call takes the next free slot now (slots may lie ahead) and waits for it.
        wait = self._quota_wait()
        slot = self.clock() + wait
        self._accepted.append(max(slot, self._accepted[-1]) if self._accepted else slot)
        if wait > 0:
            await asyncio.sleep(wait)

    def state(self) -> JSON:
        return {**super().state(), "idle_deaths": self.idle_deaths}

    def gate(self, request: web.Request, call: ApiCall) -> web.Response | None:
        if self.quota is not None and not self.smoothing:
            limit, window = self.quota
            now = self.clock()
            while self._accepted and self._accepted[0] <= now - window:
                self._accepted.popleft()
            if len(self._accepted) >= limit:
                wait = self._accepted[0] + window - now if self._accepted else window
                headers = (
                    {"Retry-After": str(max(1, math.ceil(wait)))}
                    if self.quota_retry_after
                    else None
                )
                body = {
                    "error": "quota_exceeded",
                    "error_description": "Rate limit quota violation",
                }
                return json_response(body, 429, headers)
            self._accepted.append(now)
        if any(request.path.startswith(prefix) for prefix in self.forbidden_paths):
            body = {
                "error": "insufficient_scope",
                "error_description": "Access to this API is not granted",
            }
            return json_response(body, 403)
        return None

    # authorization server ----------------------------------------------------------------

    def _client_problem(self, call: TokenCall) -> web.Response | None:
        if not call.is_form:
            return oauth_error(
                400, "invalid_request", "Expected an application/x-www-form-urlencoded body"
            )
        if self.client_matches(call, self.client_id, self.client_secret) is not None:
            return oauth_error(401, "invalid_client", "Invalid client or client credentials")
        return None

    async def _token(self, request: web.Request, call: TokenCall) -> web.Response:
        if (problem := self._client_problem(call)) is not None:
            return problem
        grant_type = call.form.get("grant_type")
        if grant_type == "password":
            if call.form.get("username") != self.saak or call.form.get("password") != self.sask:
                return oauth_error(400, "invalid_grant", "Authentication failed")
            grant_id = self.new_grant_id()
            self.grant_used[grant_id] = self.clock()
            return self._grant(grant_id, None)
        if grant_type == "refresh_token":
            refresh = call.form.get("refresh_token")
            issued = self.live_token(refresh, REFRESH)
            if refresh is None or issued is None:
                return oauth_error(400, "invalid_grant", "Invalid refresh token")
            now = self.clock()
            if now - self.grant_used.get(issued.grant_id, now) >= self.grant_idle_days * 86400:
                self.idle_deaths += 1
                self.kill_grant(issued.grant_id)
                return oauth_error(400, "invalid_grant", "Invalid refresh token")
            self.grant_used[issued.grant_id] = now
            young = (
                self.rotation_period is not None
                and now - issued.data.get("issued", now) < self.rotation_period
            )
            if self.rotate_refresh and not young:
                self.kill_token(refresh)
                return self._grant(issued.grant_id, None)
            return self._grant(issued.grant_id, refresh)
        return oauth_error(400, "unsupported_grant_type", f"Unsupported grant type: {grant_type}")

    def _grant(self, grant_id: str, keep_refresh: str | None) -> web.Response:
        claims = {"tenant": self.tenant, "client_id": self.client_id, "scope": "openid"}
        access = self.issue(
            "access",
            grant_id=grant_id,
            subject=self.saak,
            lifetime=self.token_lifetime,
            claims=claims,
        )
        body: JSON = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": self.token_lifetime,
        }
        if keep_refresh is not None:
            body["refresh_token"] = keep_refresh
        elif self.issue_refresh:
            # Infor grants live 30 days by default; the simulator lets them live until revoked.
            body["refresh_token"] = self.issue(
                "refresh",
                grant_id=grant_id,
                subject=self.saak,
                lifetime=None,
                claims=claims,
                data={"issued": self.clock()},
            )
        return token_response(body)

    async def _revoke(self, request: web.Request, call: TokenCall) -> web.Response:
        if (problem := self._client_problem(call)) is not None:
            return problem
        token = call.form.get("token")
        if not token:
            return oauth_error(400, "invalid_request", "Missing token")
        self.revoke(token)
        return web.Response(status=200)

    # gateway -----------------------------------------------------------------------------

    async def _me(self, request: web.Request, call: ApiCall) -> web.Response:
        user = {
            "id": "d4c3b2a1-0000-4000-8000-00000000cafe",
            "userName": self.saak,
            "displayName": "erp-broker service account",
            "name": {"givenName": "erp-broker", "familyName": "service"},
            "title": "",
            "emails": [],
            "groups": [{"value": "IONAPI-User", "display": "IONAPI-User"}],
            "tenant": self.tenant,
        }
        return json_response({"response": {"userlist": [user]}})

    async def _m3(self, request: web.Request, call: ApiCall) -> web.Response:
        transaction = request.match_info["transaction"]
        records = [
            {"CONO": "100", "CUNO": "10007", "CUNM": "Nordic Tools AB"},
            {"CONO": "100", "CUNO": "10008", "CUNM": "ACME Corporation"},
        ]
        return json_response(
            {
                "results": [
                    {
                        "transaction": transaction,
                        "program": request.match_info["program"],
                        "records": records,
                    }
                ],
                "wasTerminated": False,
                "nrOfSuccessfullTransactions": 1,
                "nrOfFailedTransactions": 0,
            }
        )

    async def _not_found(self, request: web.Request, call: ApiCall) -> web.Response:
        return json_response(
            {"error": "not_found", "error_description": f"No API at {request.path}"}, 404
        )
