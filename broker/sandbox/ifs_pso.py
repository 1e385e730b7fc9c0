"""IFS PSO simulator: the Scheduling RESTful Gateway's session login and data calls.

Routes (besides the shared ``/_sandbox/`` and ``/_test/`` ones of :mod:`broker.sandbox.base`),
all under ``/IFSSchedulingRESTfulGateway/api/v1/scheduling``::

    POST   /session      form accountId, userName, password → 200 {"SessionToken": "..."}
                         bad credentials, wrong account id or wrong field names → 400
                         {"Message": "AUTHENTICATION_FAILED"}; credentials in the query string
                         → 400 (refused since 6.11). Recorded grant "session".
    GET    /session      apiKey header: 200 while the session lives, else 401
    DELETE /session      apiKey header: logout [guess: PSO documents none]; recorded grant "logout"
    GET    /data         apiKey → {"dsScheduleData": {...}}
    POST   /data         apiKey → {"dsScheduleData": {...}} echoing the posted document
    GET    /resource     apiKey → {"dsScheduleData": {"Resources": [...]}}
    POST   /appointment  apiKey → {"dsScheduleData": {"Appointment_Offer": [...]}}

A missing, unknown or expired session on any apiKey call, by ``dead_session_style`` (real
clients handle all three; which one a Gateway uses is not documented)::

    "401" (default)  401 {"Message": "Authorization has been denied for this request."}
    "400"            400 {"Message": "AUTHENTICATION_FAILED"}   what current clients handle
    "200"            200 {"Code": 401, "Message": "INVALID_SESSION"}   older Gateways

Sessions never expire unless ``session_lifetime`` is set (seconds from login; then the token's
JWT ``exp`` says so too) or ``session_idle_timeout`` is (seconds without a call) [guess: PSO
documents neither]. Switches are settable with ``POST /_sandbox/switches``, e.g.
``{"dead_session_style": "200", "session_idle_timeout": 1200}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson
from aiohttp import web

from .base import (
    ApiCall,
    IssuedToken,
    Simulator,
    TokenCall,
    Validator,
    as_float,
    as_str,
    json_response,
    optional,
)

PSO_BASE = "/IFSSchedulingRESTfulGateway/api/v1/scheduling"
SESSION = frozenset({"session"})
_CREDENTIAL_FIELDS = frozenset({"accountid", "username", "password"})
DEAD_SESSION_STYLES = ("400", "401", "200")


def _style(value: object) -> str:
    text = str(value)
    if text not in DEAD_SESSION_STYLES:
        raise ValueError(f"expected one of {', '.join(DEAD_SESSION_STYLES)}")
    return text


def pso_message(status: int, message: str) -> web.Response:
    return json_response({"Message": message}, status)


class PsoSim(Simulator):
    """PSO Gateway; ``apiKey`` header carries the session token."""

    settable: ClassVar[Mapping[str, Validator]] = {
        **Simulator.settable,
        "account_id": as_str,
        "username": as_str,
        "password": as_str,
        "session_lifetime": optional(as_float),
        "session_idle_timeout": optional(as_float),
        "dead_session_style": _style,
    }

    def __init__(
        self,
        *,
        account_id: str = "ACME",
        username: str = "svc-broker",
        password: str = "pso-password",
        session_lifetime: float | None = None,
        session_idle_timeout: float | None = None,
        dead_session_style: str = "401",
        **switches: Any,
    ) -> None:
        super().__init__()
        self.session_idle_timeout = session_idle_timeout
        self.dead_session_style = _style(dead_session_style)
        self.account_id = account_id
        self.username = username
        self.password = password
        self.session_lifetime = session_lifetime
        self.set_switches(switches)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post(PSO_BASE + "/session", self.token_route(self._login, "session"))
        router.add_delete(PSO_BASE + "/session", self.token_route(self._logout, "logout"))
        router.add_route("GET", PSO_BASE + "/session", self.api_route(self._session_info))
        router.add_route("GET", PSO_BASE + "/data", self.api_route(self._get_data))
        router.add_route("POST", PSO_BASE + "/data", self.api_route(self._post_data))
        router.add_route("GET", PSO_BASE + "/resource", self.api_route(self._resources))
        router.add_route("POST", PSO_BASE + "/appointment", self.api_route(self._appointment))

    def credential_of(self, request: web.Request) -> str | None:
        return request.headers.get("apiKey") or None

    def unauthorized(self, request: web.Request, credential: str | None) -> web.Response:
        if self.dead_session_style == "400":
            return pso_message(400, "AUTHENTICATION_FAILED")
        if self.dead_session_style == "200":
            return json_response({"Code": 401, "Message": "INVALID_SESSION"})
        return pso_message(401, "Authorization has been denied for this request.")

    def live_token(self, token: str | None, kinds: frozenset[str]) -> IssuedToken | None:
        """A session also dies after ``session_idle_timeout`` seconds without a call."""
        issued = super().live_token(token, kinds)
        if issued is None or issued.kind != "session":
            return issued
        now = self.clock()
        last = issued.data.get("last_used", now)
        if self.session_idle_timeout is not None and now - last >= self.session_idle_timeout:
            issued.alive = False
            return None
        issued.data["last_used"] = now
        return issued

    async def _login(self, request: web.Request, call: TokenCall) -> web.Response:
        if any(name.lower() in _CREDENTIAL_FIELDS for name in request.query):
            return pso_message(400, "CREDENTIALS_IN_QUERY_STRING_NOT_ALLOWED")
        form = call.form
        if (
            form.get("accountId") != self.account_id
            or form.get("userName") != self.username
            or form.get("password") != self.password
        ):
            return pso_message(400, "AUTHENTICATION_FAILED")
        token = self.issue(
            "session",
            grant_id=self.new_grant_id(),
            subject=self.username,
            lifetime=self.session_lifetime,
            claims={"account": self.account_id},
            data={"last_used": self.clock()},
        )
        return json_response({"SessionToken": token})

    async def _logout(self, request: web.Request, call: TokenCall) -> web.Response:
        token = self.credential_of(request)
        if token is None or self.live_token(token, SESSION) is None:
            return self.unauthorized(request, token)
        self.revoke(token)
        return json_response({"Message": "SESSION_CLOSED"})

    async def _session_info(self, request: web.Request, call: ApiCall) -> web.Response:
        return json_response(
            {"AccountId": self.account_id, "UserName": self.username, "Valid": True}
        )

    async def _get_data(self, request: web.Request, call: ApiCall) -> web.Response:
        return json_response(
            {
                "dsScheduleData": {
                    "Schedule_Data": [
                        {"id": "SD1", "dataset_id": request.query.get("datasetId", "DEFAULT")}
                    ],
                    "Activity": [
                        {"id": "A100", "activity_type_id": "REPAIR", "duration": "PT1H"},
                        {"id": "A101", "activity_type_id": "INSTALL", "duration": "PT2H30M"},
                    ],
                }
            }
        )

    async def _post_data(self, request: web.Request, call: ApiCall) -> web.Response:
        try:
            posted: Any = orjson.loads(call.body) if call.body else None
        except orjson.JSONDecodeError:
            return pso_message(400, "INVALID_INPUT")
        if isinstance(posted, dict) and "dsScheduleData" in posted:
            posted = posted["dsScheduleData"]
        return json_response(
            {
                "dsScheduleData": {
                    "Input_Reference": [
                        {"id": "IR1", "input_type": "CHANGE", "load_status": "ACCEPTED"}
                    ],
                    "Received": posted,
                }
            }
        )

    async def _resources(self, request: web.Request, call: ApiCall) -> web.Response:
        return json_response(
            {
                "dsScheduleData": {
                    "Resources": [
                        {
                            "id": "R1",
                            "first_name": "Ada",
                            "surname": "Lind",
                            "resource_type_id": "ENG",
                        },
                        {
                            "id": "R2",
                            "first_name": "Bo",
                            "surname": "Nyberg",
                            "resource_type_id": "ENG",
                        },
                    ]
                }
            }
        )

    async def _appointment(self, request: web.Request, call: ApiCall) -> web.Response:
        return json_response(
            {
                "dsScheduleData": {
                    "Appointment_Offer": [
                        {
                            "id": 1,
                            "window_start": "2024-05-02T08:00:00",
                            "window_end": "2024-05-02T12:00:00",
                        },
                        {
                            "id": 2,
                            "window_start": "2024-05-02T12:00:00",
                            "window_end": "2024-05-02T16:00:00",
                        },
                    ]
                }
            }
        )
