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

A missing, unknown or expired session on any apiKey call: 401
``{"Message": "Authorization has been denied for this request."}`` (the gateway is ASP.NET).
Sessions never expire unless ``session_lifetime`` is set (seconds from login, not idle time);
then the token's JWT ``exp`` says so too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import orjson
from aiohttp import web

from .base import (
    ApiCall,
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
    }

    def __init__(
        self,
        *,
        account_id: str = "ACME",
        username: str = "svc-broker",
        password: str = "pso-password",
        session_lifetime: float | None = None,
    ) -> None:
        super().__init__()
        self.account_id = account_id
        self.username = username
        self.password = password
        self.session_lifetime = session_lifetime

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
        return pso_message(401, "Authorization has been denied for this request.")

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
