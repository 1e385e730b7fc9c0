"""IFS Applications 10 / IFS Cloud simulator: Keycloak (IFS IAM) in front of IFS OData projections.

Routes (besides the shared ``/_sandbox/`` and ``/_test/`` ones of :mod:`broker.sandbox.base`)::

    POST /auth/realms/{realm}/protocol/openid-connect/token    password / refresh_token grants
    POST /auth/realms/{realm}/protocol/openid-connect/logout   refresh_token + client → 204
    POST /auth/realms/{realm}/protocol/openid-connect/revoke   RFC 7009 token revocation → 200
    GET  /auth/realms/{realm}/.well-known/openid-configuration
    POST /openid-connect-provider/idp/token                    Native Apps 10 provider (same grants;
                                                               ``native_resource`` makes its
                                                               ``resource`` field required)
    GET  /openid-connect-provider/.well-known/openid-configuration
    *    /main/ifsapplications/projection/v1/{Projection}.svc/...   OData v4, Bearer:
         GET  AllProjections.svc/Projections        {"value": [{"Name", "Description"}, ...]}
         GET  <P>.svc/                              service document
         GET  <P>.svc/$metadata                     EDMX
         GET  <P>.svc/$openapi[?V3|?V2]             OpenAPI 3.0.1 / Swagger 2.0
         GET  <P>.svc/<Set>[?$top=&$select=]        {"@odata.context", "value": [...]}
         POST <P>.svc/<Set>                         201 with the new entity
         GET|PATCH|DELETE <P>.svc/<Set>(<key>)      e.g. CustomerInfoSet(CustomerId='10%2F7')
    *    /int/{anything}                            the Apps 10 integration cluster: HTTP Basic
                                                    with username/password → {"cluster", ...}

Projections: CustomerHandling (CustomerInfoSet), PurchaseOrderHandling (PurchaseOrderSet),
WorkOrderHandling (ActiveSeparateSet, numeric key ``WoNo=1001``). Recorded grants: the form's
``grant_type`` (``password``, ``refresh_token``, ...), ``logout``, ``revoke``.

Keycloak's answers: bad user credentials 401 ``invalid_grant`` "Invalid user credentials";
unknown client 401 ``invalid_client``; wrong client secret 401 ``unauthorized_client``;
dead/used/unknown refresh token 400 ``invalid_grant`` "Token is not active"; unknown grant 400
``unsupported_grant_type``; missing grant or non-form body 400 ``invalid_request``; wrong realm
404 ``{"error": "Realm does not exist"}``. ``id_token`` is only issued when ``scope`` has
``openid`` (as Keycloak does).

Identity-provider switches (constructor arguments, or ``POST /_sandbox/switches``)::

    keycloak_version        "26.5": bad user credentials are 401 up to 26.5, 400 from 26.6
    brute_force             Keycloak's brute-force detection, with its defaults:
      failure_factor 30, wait_increment 60 s, max_failure_wait 900 s, quick_login_check 1.0 s,
      minimum_quick_login_wait 60 s, max_delta_time 12 h, permanent_lockout false.
      A failure less than quick_login_check after the previous one locks the user for
      max(minimum_quick_login_wait, wait); every failure_factor-th failure locks for
      wait_increment * (failures // failure_factor), at most max_failure_wait; with
      permanent_lockout that lock disables the user instead. While locked even the right
      password gets "Invalid user credentials"; a success clears the failures.
    user_enabled            false: 400 invalid_grant "Account disabled"
    user_set_up             false: 400 invalid_grant "Account is not fully set up"
    direct_grants           false: 400 unauthorized_client "Client not allowed for direct
                            access grants"
    client_enabled          false: 401 invalid_client (a wrong or disabled client)
    service_accounts        false: client_credentials gets 400 unauthorized_client
    revoke_refresh_token    "Revoke Refresh Token": a refresh token works once; presenting a
                            used one ends the whole session (its newest refresh token too),
                            answers "Maximum allowed refresh token reuse exceeded" and counts
                            ``refresh_reuse_events``
    native_resource         the native provider requires this ``resource`` form field
    id_token_only           the API accepts only the ID token as the Bearer
    expires_in_string       ``expires_in`` is sent as a string ("180"), as native providers do
    mi_modified_errors      the next n OData calls answer 500 MI_MODIFIED_ERROR
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from aiohttp import web

from .base import (
    JSON,
    ApiCall,
    IssuedToken,
    Simulator,
    TokenCall,
    Validator,
    as_bool,
    as_float,
    as_int,
    as_str,
    basic_credentials,
    json_response,
    oauth_error,
    optional,
    token_response,
)
from .ifs_projections import (
    BY_NAME,
    PROJECTIONS,
    EntitySet,
    Projection,
    key_predicate,
    max_page_size,
    metadata_xml,
    openapi_document,
    page_of,
    parse_key,
)

API_PREFIX = "/main/ifsapplications/projection/v1"
REFRESH = frozenset({"refresh"})
_DEFAULT_SCOPES = ("profile", "email")
_KNOWN_SCOPES = frozenset(
    {"openid", "microprofile-jwt", "profile", "email", "roles", "offline_access"}
)
_RESOURCE = re.compile(r"(?P<set>[A-Za-z_]\w*)(?:\((?P<key>.*)\))?")


def odata_error(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status)


def _version(value: object) -> tuple[int, int]:
    parts = str(value).split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise ValueError("expected a version like 26.5") from None


@dataclass(slots=True)
class LoginFailures:
    """Keycloak's per-user brute-force record (``UserLoginFailureModel``)."""

    failures: int = 0
    last_failure: float = 0.0
    not_before: float = 0.0
    lockouts: int = 0


class IfsApps10Sim(Simulator):
    """Keycloak + IFS OData; credentials are plain attributes a test may change."""

    settable: ClassVar[Mapping[str, Validator]] = {
        **Simulator.settable,
        "page_size": optional(as_int),
        "gzip": as_bool,
        "client_id": as_str,
        "client_secret": as_str,
        "username": as_str,
        "password": as_str,
        "token_lifetime": as_int,
        "refresh_lifetime": as_int,
        "rotate_refresh": as_bool,
        "omit_expires_in": as_bool,
        "keycloak_version": as_str,
        "brute_force": as_bool,
        "failure_factor": as_int,
        "wait_increment": as_float,
        "max_failure_wait": as_float,
        "quick_login_check": as_float,
        "minimum_quick_login_wait": as_float,
        "max_delta_time": as_float,
        "permanent_lockout": as_bool,
        "user_enabled": as_bool,
        "user_set_up": as_bool,
        "direct_grants": as_bool,
        "client_enabled": as_bool,
        "service_accounts": as_bool,
        "revoke_refresh_token": as_bool,
        "native_resource": optional(as_str),
        "id_token_only": as_bool,
        "expires_in_string": as_bool,
        "mi_modified_errors": as_int,
    }

    def __init__(
        self,
        *,
        realm: str = "ifsapps",
        client_id: str = "erp-broker",
        client_secret: str = "ifs-client-secret",
        username: str = "IFSAPP",
        password: str = "ifs-password",
        token_lifetime: int = 180,
        refresh_lifetime: int = 1800,
        rotate_refresh: bool = False,
        omit_expires_in: bool = False,
        keycloak_version: str = "26.5",
        brute_force: bool = False,
        revoke_refresh_token: bool = False,
        native_resource: str | None = None,
        id_token_only: bool = False,
        **switches: Any,
    ) -> None:
        super().__init__()
        _version(keycloak_version)
        self.keycloak_version = keycloak_version
        self.brute_force = brute_force
        self.failure_factor = 30
        self.wait_increment = 60.0
        self.max_failure_wait = 900.0
        self.quick_login_check = 1.0
        self.minimum_quick_login_wait = 60.0
        self.max_delta_time = 12 * 3600.0
        self.permanent_lockout = False
        self.user_enabled = True
        self.user_set_up = True
        self.direct_grants = True
        self.client_enabled = True
        self.service_accounts = True
        self.revoke_refresh_token = revoke_refresh_token
        self.native_resource = native_resource
        self.id_token_only = id_token_only
        self.expires_in_string = False
        self.mi_modified_errors = 0
        #: Used refresh tokens presented again while revoke_refresh_token is on.
        self.refresh_reuse_events = 0
        #: Logins refused because the user was locked (temporarily or for good).
        self.locked_refusals = 0
        self.login_failures = LoginFailures()
        self.set_switches(switches)
        self.realm = realm
        self.client_id = client_id
        self.client_secret = client_secret
        self.username = username
        self.password = password
        self.token_lifetime = token_lifetime
        self.refresh_lifetime = refresh_lifetime
        #: Keycloak's "Revoke Refresh Token": each refresh kills the refresh token it used.
        self.rotate_refresh = rotate_refresh
        self.omit_expires_in = omit_expires_in
        #: Server-driven paging: at most this many entities per answer (``Prefer:
        #: odata.maxpagesize`` lowers it per request), the rest behind ``@odata.nextLink``.
        self.page_size: int | None = None
        #: OData answers gzip-compressed when the client's Accept-Encoding allows it.
        self.gzip = True
        self.user_id = str(uuid.uuid4())
        #: Entity data per (projection, entity set): POST / PATCH / DELETE change it.
        self.entities: dict[tuple[str, str], list[JSON]] = {
            (p.name, es.name): [dict(row) for row in es.rows]
            for p in PROJECTIONS
            for es in p.entity_sets
        }

    # routes ------------------------------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        oidc = "/auth/realms/{realm}/protocol/openid-connect"
        router.add_post(oidc + "/token", self.token_route(self._token))
        router.add_post(oidc + "/logout", self.token_route(self._logout, "logout"))
        router.add_post(oidc + "/revoke", self.token_route(self._revoke, "revoke"))
        router.add_get("/auth/realms/{realm}/.well-known/openid-configuration", self._discovery)
        router.add_post("/openid-connect-provider/idp/token", self.token_route(self._token))
        router.add_get("/openid-connect-provider/.well-known/openid-configuration", self._discovery)
        router.add_route("*", API_PREFIX + "/{tail:.*}", self.api_route(self._odata))
        router.add_route("*", "/int/{tail:.*}", self.api_route(self._integration))

    async def _integration(self, request: web.Request, call: ApiCall) -> web.Response:
        body = {"cluster": "integration", "method": request.method, "path": request.path}
        return json_response(body)

    def credential_of(self, request: web.Request) -> str | None:
        if request.path.startswith("/int/"):
            # The integration cluster: HTTP Basic, checked in live_token.
            return request.headers.get("Authorization") or None
        return super().credential_of(request)

    def live_token(self, token: str | None, kinds: frozenset[str]) -> IssuedToken | None:
        if token is not None and token[:6].lower() == "basic ":
            basic = basic_credentials(token)
            ok = (
                basic is not None
                and basic[0].lower() == self.username.lower()
                and basic[1] == self.password
                and self.user_enabled
            )
            return IssuedToken("access", "basic", self.username, None) if ok else None
        issued = super().live_token(token, kinds)
        if issued is not None and issued.kind == "access":
            # An ID token is a Bearer only where the provider accepts only ID tokens.
            if bool(issued.data.get("id_token")) != self.id_token_only:
                return None
        return issued

    def state(self) -> JSON:
        return {
            **super().state(),
            "refresh_reuse_events": self.refresh_reuse_events,
            "locked_refusals": self.locked_refusals,
            "login_failures": self.login_failures.failures,
            "locked": self.locked(),
            "user_enabled": self.user_enabled,
        }

    def locked(self) -> bool:
        """True while brute-force detection refuses this user (even the right password)."""
        return not self.user_enabled or self.clock() < self.login_failures.not_before

    def unauthorized(self, request: web.Request, credential: str | None) -> web.Response:
        challenge = f'Bearer realm="{self.realm}"'
        if credential is not None:
            challenge += ', error="invalid_token", error_description="Token is not active"'
        response = odata_error(
            401, "ODP_UNAUTHORIZED", "The access token is missing, invalid or expired."
        )
        response.headers["WWW-Authenticate"] = challenge
        return response

    # Keycloak ----------------------------------------------------------------------------

    def _issuer(self, request: web.Request) -> str:
        if "realm" in request.match_info:
            return f"{self.url}/auth/realms/{self.realm}"
        return f"{self.url}/openid-connect-provider"

    def _realm_missing(self, request: web.Request) -> web.Response | None:
        realm = request.match_info.get("realm")
        if realm is not None and realm != self.realm:
            return json_response({"error": "Realm does not exist"}, 404)
        return None

    def _client_problem(self, call: TokenCall) -> web.Response | None:
        problem = self.client_matches(call, self.client_id, self.client_secret)
        if problem == "unknown_client" or not self.client_enabled:
            return oauth_error(
                401, "invalid_client", "Invalid client or Invalid client credentials"
            )
        if problem == "bad_secret":
            return oauth_error(
                401, "unauthorized_client", "Invalid client or Invalid client credentials"
            )
        return None

    def _precheck(
        self, request: web.Request, call: TokenCall, *, needs_grant: bool = False
    ) -> web.Response | None:
        """What Keycloak checks before the grant itself, in its order: realm, form, client."""
        if (problem := self._realm_missing(request)) is not None:
            return problem
        if not call.is_form:
            return oauth_error(
                400, "invalid_request", "Expected an application/x-www-form-urlencoded body"
            )
        if needs_grant and not call.form.get("grant_type"):
            return oauth_error(400, "invalid_request", "Missing form parameter: grant_type")
        return self._client_problem(call)

    async def _token(self, request: web.Request, call: TokenCall) -> web.Response:
        if (problem := self._precheck(request, call, needs_grant=True)) is not None:
            return problem
        grant_type = call.form["grant_type"]
        if "realm" not in request.match_info and self.native_resource is not None:
            if call.form.get("resource") != self.native_resource:
                return oauth_error(400, "invalid_request", "Missing or unknown resource")
        if grant_type == "password":
            return self._password_grant(request, call)
        if grant_type == "refresh_token":
            refresh = call.form.get("refresh_token")
            known = self._issued.get(refresh) if refresh else None
            if (
                self.revoke_refresh_token
                and known is not None
                and known.kind == "refresh"
                and known.data.get("used")
            ):
                # Keycloak ends the whole session: the newest refresh token dies too.
                self.refresh_reuse_events += 1
                self.kill_grant(known.grant_id)
                return oauth_error(
                    400, "invalid_grant", "Maximum allowed refresh token reuse exceeded"
                )
            issued = self.live_token(refresh, REFRESH)
            if refresh is None or issued is None:
                return oauth_error(400, "invalid_grant", "Token is not active")
            if self.rotate_refresh or self.revoke_refresh_token:
                self.kill_token(refresh)
                issued.data["used"] = True
            return self._grant(
                request, issued.grant_id, issued.data["session_state"], issued.data["scope"]
            )
        if grant_type == "client_credentials":
            if not self.service_accounts:
                return oauth_error(
                    400, "unauthorized_client", "Client not enabled to retrieve service account"
                )
            scope = self._granted_scope(call.form.get("scope", ""))
            return self._grant(
                request, self.new_grant_id(), str(uuid.uuid4()), scope, with_refresh=False
            )
        return oauth_error(400, "unsupported_grant_type", "Unsupported grant_type")

    def _invalid_credentials(self) -> web.Response:
        status = 400 if _version(self.keycloak_version) >= (26, 6) else 401
        return oauth_error(status, "invalid_grant", "Invalid user credentials")

    def _password_grant(self, request: web.Request, call: TokenCall) -> web.Response:
        """Keycloak's direct grant, in its order: client allowed, user state, lock, password."""
        if not self.direct_grants:
            return oauth_error(
                400, "unauthorized_client", "Client not allowed for direct access grants"
            )
        username = call.form.get("username", "")
        if username.lower() != self.username.lower():
            return self._invalid_credentials()
        if not self.user_enabled:
            return oauth_error(400, "invalid_grant", "Account disabled")
        if self.brute_force and self.locked():
            self.locked_refusals += 1
            return self._invalid_credentials()
        if call.form.get("password") != self.password:
            if self.brute_force:
                self._record_failure()
            return self._invalid_credentials()
        self.login_failures = LoginFailures()  # a success clears the record
        if not self.user_set_up:
            return oauth_error(400, "invalid_grant", "Account is not fully set up")
        scope = self._granted_scope(call.form.get("scope", ""))
        return self._grant(request, self.new_grant_id(), str(uuid.uuid4()), scope)

    def _record_failure(self) -> None:
        """Keycloak's ``BruteForceProtector.failure`` arithmetic."""
        record = self.login_failures
        now = self.clock()
        delta = now - record.last_failure if record.last_failure else 0.0
        if delta > self.max_delta_time:
            record.failures = 0
        record.failures += 1
        record.last_failure = now
        wait = 0.0
        if record.failures % self.failure_factor == 0:
            wait = min(
                self.max_failure_wait,
                self.wait_increment * (record.failures // self.failure_factor),
            )
            if self.permanent_lockout:
                self.user_enabled = False  # Keycloak disables the user
                return
        if 0 < delta < self.quick_login_check:
            wait = max(self.minimum_quick_login_wait, wait)
        if wait > 0:
            record.not_before = now + wait
            record.lockouts += 1

    @staticmethod
    def _granted_scope(requested: str) -> str:
        wanted = [s for s in requested.split() if s in _KNOWN_SCOPES]
        return " ".join(dict.fromkeys([*wanted, *_DEFAULT_SCOPES]))

    def _grant(
        self,
        request: web.Request,
        grant_id: str,
        session_state: str,
        scope: str,
        *,
        with_refresh: bool = True,
    ) -> web.Response:
        issuer = self._issuer(request)
        common = {
            "iss": issuer,
            "azp": self.client_id,
            "session_state": session_state,
            "sid": session_state,
        }
        user = {"preferred_username": self.username.lower(), "scope": scope}
        access = self.issue(
            "access",
            grant_id=grant_id,
            subject=self.user_id,
            lifetime=self.token_lifetime,
            claims={**common, **user, "typ": "Bearer", "aud": "account"},
        )
        body: JSON = {"access_token": access}
        if not self.omit_expires_in:
            body["expires_in"] = (
                str(self.token_lifetime) if self.expires_in_string else self.token_lifetime
            )
        if with_refresh:
            body["refresh_expires_in"] = self.refresh_lifetime
            body["refresh_token"] = self.issue(
                "refresh",
                grant_id=grant_id,
                subject=self.user_id,
                lifetime=self.refresh_lifetime,
                claims={**common, "typ": "Refresh", "aud": issuer, "scope": scope},
                data={"session_state": session_state, "scope": scope},
            )
        body["token_type"] = "Bearer"
        if "openid" in scope.split():
            body["id_token"] = self.issue(
                "access",
                grant_id=grant_id,
                subject=self.user_id,
                lifetime=self.token_lifetime,
                claims={**common, **user, "typ": "ID", "aud": self.client_id},
                data={"id_token": True},
            )
        body |= {"not-before-policy": 0, "session_state": session_state, "scope": scope}
        return token_response(body)

    async def _logout(self, request: web.Request, call: TokenCall) -> web.Response:
        if (problem := self._precheck(request, call)) is not None:
            return problem
        refresh = call.form.get("refresh_token")
        if refresh is None or self.live_token(refresh, REFRESH) is None:
            return oauth_error(400, "invalid_grant", "Invalid refresh token")
        self.revoke(refresh)
        return web.Response(status=204)

    async def _revoke(self, request: web.Request, call: TokenCall) -> web.Response:
        if (problem := self._precheck(request, call)) is not None:
            return problem
        token = call.form.get("token")
        if not token:
            return oauth_error(400, "invalid_request", "Token not provided")
        self.revoke(token)
        return web.Response(status=200)

    async def _discovery(self, request: web.Request) -> web.Response:
        if (problem := self._realm_missing(request)) is not None:
            return problem
        issuer = self._issuer(request)
        if "realm" in request.match_info:
            base = f"{issuer}/protocol/openid-connect"
            paths = {
                "authorization": "auth",
                "token": "token",
                "userinfo": "userinfo",
                "end_session": "logout",
                "revocation": "revoke",
                "jwks": "certs",
            }
        else:
            base = f"{issuer}/idp"
            paths = {
                "authorization": "authorize",
                "token": "token",
                "userinfo": "userinfo",
                "end_session": "logout",
                "revocation": "revoke",
                "jwks": "jwks",
            }
        doc: JSON = {"issuer": issuer}
        for name, path in paths.items():
            key = "jwks_uri" if name == "jwks" else f"{name}_endpoint"
            doc[key] = f"{base}/{path}"
        doc |= {
            "grant_types_supported": [
                "authorization_code",
                "password",
                "refresh_token",
                "client_credentials",
            ],
            "response_types_supported": ["code", "id_token", "token id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "scopes_supported": sorted(_KNOWN_SCOPES),
        }
        return json_response(doc)

    # OData -------------------------------------------------------------------------------

    async def _odata(self, request: web.Request, call: ApiCall) -> web.Response:
        if self.mi_modified_errors > 0:
            # IFS raises it before executing anything after a metadata change.
            self.mi_modified_errors -= 1
            return odata_error(
                500, "MI_MODIFIED_ERROR", "The metadata has been modified; retry the request."
            )
        path, _, query_string = request.raw_path.partition("?")
        service, _, resource = path[len(API_PREFIX) :].lstrip("/").partition("/")
        query = urllib.parse.parse_qs(query_string, keep_blank_values=True)
        if not service.endswith(".svc"):
            return odata_error(404, "ODP_NOT_FOUND", f"No projection service at {path}")
        name = urllib.parse.unquote(service[: -len(".svc")])
        if urllib.parse.unquote(resource).startswith("$"):  # $metadata may come as %24metadata
            resource = urllib.parse.unquote(resource)
        if name == "AllProjections" and resource == "Projections":
            return self._only_get(request) or self._projection_list()
        projection = BY_NAME.get(name)
        if projection is None:
            return odata_error(404, "ODP_NOT_FOUND", f"The projection '{name}' does not exist")
        service_url = self._service_url(projection.name)
        if resource == "":
            return self._only_get(request) or json_response(
                {
                    "@odata.context": f"{service_url}/$metadata",
                    "value": [
                        {"name": s.name, "kind": "EntitySet", "url": s.name}
                        for s in projection.entity_sets
                    ],
                }
            )
        if resource == "$metadata":
            return self._only_get(request) or web.Response(
                text=metadata_xml(projection), content_type="application/xml"
            )
        if resource == "$openapi":
            version = 2 if "V2" in query else 3
            return self._only_get(request) or json_response(
                openapi_document(projection, self.url, version)
            )
        match = _RESOURCE.fullmatch(resource)
        entity_set = projection.entity_set(match["set"]) if match else None
        if match is None or entity_set is None:
            return odata_error(
                404, "ODP_NOT_FOUND", f"Resource '{resource}' not found in {projection.name}"
            )
        context = f"{service_url}/$metadata#{entity_set.name}"
        rows = self.entities[projection.name, entity_set.name]
        if match["key"] is None:
            return self._collection(request, call, projection, entity_set, rows, query, context)
        key = parse_key(match["key"])
        if key is not None and set(key) == {""} and len(entity_set.keys) == 1:
            key = {entity_set.keys[0]: key[""]}  # the short form: Set('10%2F7')
        if key is None:
            return odata_error(400, "ODP_INVALID_KEY", f"Invalid key predicate ({match['key']})")
        return self._entity(request, call, entity_set, rows, key, context)

    def _service_url(self, projection: str) -> str:
        return f"{self.url}{API_PREFIX}/{projection}.svc"

    @staticmethod
    def _only_get(request: web.Request) -> web.Response | None:
        if request.method in ("GET", "HEAD"):
            return None
        return odata_error(405, "ODP_METHOD_NOT_ALLOWED", f"{request.method} is not allowed here")

    def _projection_list(self) -> web.Response:
        return json_response(
            {
                "@odata.context": self._service_url("AllProjections") + "/$metadata#Projections",
                "value": [{"Name": p.name, "Description": p.description} for p in PROJECTIONS],
            }
        )

    @staticmethod
    def _etag(row: JSON) -> str:
        digest = hashlib.sha256(orjson.dumps(row, option=orjson.OPT_SORT_KEYS)).hexdigest()[:20]
        return f'W/"{digest}"'

    def _collection(
        self,
        request: web.Request,
        call: ApiCall,
        projection: Projection,
        entity_set: EntitySet,
        rows: list[JSON],
        query: dict[str, list[str]],
        context: str,
    ) -> web.Response:
        if request.method == "POST":
            try:
                row = orjson.loads(call.body)
                if not isinstance(row, dict) or any(k not in row for k in entity_set.keys):
                    raise ValueError
            except ValueError:
                return odata_error(
                    400,
                    "ODP_INVALID_REQUEST",
                    f"A {entity_set.entity_type} needs its keys {list(entity_set.keys)}",
                )
            if any(entity_set.key_of(r) == entity_set.key_of(row) for r in rows):
                return odata_error(
                    400, "DATABASE_ERROR", f"The {entity_set.entity_type} already exists."
                )
            rows.append(row)
            created = json_response(
                {"@odata.context": context + "/$entity", "@odata.etag": self._etag(row), **row}, 201
            )
            created.headers["Location"] = self._entity_url(projection, entity_set, row)
            return created
        if (problem := self._only_get(request)) is not None:
            return problem
        prefer = max_page_size(request.headers.get("Prefer", ""))
        sizes = [n for n in (self.page_size, prefer) if n is not None]
        try:
            page = page_of(rows, request.raw_path.partition("?")[2], min(sizes, default=None))
        except ValueError as exc:
            return odata_error(400, "ODP_INVALID_REQUEST", str(exc))
        fields = query["$select"][0].split(",") if "$select" in query else None
        full = "odata.metadata=full" in request.headers.get("Accept", "").replace(" ", "")
        value = [
            {"@odata.etag": self._etag(row)}
            | ({"@odata.id": self._entity_url(projection, entity_set, row)} if full else {})
            | {k: v for k, v in row.items() if fields is None or k in fields}
            for row in page.rows
        ]
        body: JSON = {"@odata.context": context, "value": value}
        if page.next_query is not None:
            next_url = f"{self._service_url(projection.name)}/{entity_set.name}"
            body["@odata.nextLink"] = f"{next_url}?{page.next_query}"
        answer = json_response(body)
        if prefer is not None:
            answer.headers["Preference-Applied"] = f"odata.maxpagesize={prefer}"
        return self._compressed(request, answer)

    def _entity_url(self, projection: Projection, entity_set: EntitySet, row: JSON) -> str:
        service = self._service_url(projection.name)
        return f"{service}/{entity_set.name}({key_predicate(entity_set, row)})"

    def _compressed(self, request: web.Request, answer: web.Response) -> web.Response:
        """gzip when the client accepts it, as IFS behind its web server does."""
        accepted = request.headers.get("Accept-Encoding", "").lower()
        if self.gzip and "gzip" in accepted:
            answer.enable_compression(web.ContentCoding.gzip)
        return answer

    def _entity(
        self,
        request: web.Request,
        call: ApiCall,
        entity_set: EntitySet,
        rows: list[JSON],
        key: dict[str, str],
        context: str,
    ) -> web.Response:
        wanted = tuple(key.get(k, "\0") for k in entity_set.keys)
        row = next((r for r in rows if entity_set.key_of(r) == wanted), None)
        if row is None or set(key) != set(entity_set.keys):
            return odata_error(404, "ODP_NOT_FOUND", f"No {entity_set.entity_type} with key {key}")
        if request.method == "DELETE":
            rows.remove(row)
            return web.Response(status=204)
        if request.method == "PATCH":
            try:
                changes: Any = orjson.loads(call.body)
                if not isinstance(changes, dict):
                    raise ValueError
            except ValueError:
                return odata_error(400, "ODP_INVALID_REQUEST", "Expected a JSON object")
            row.update({k: v for k, v in changes.items() if k not in entity_set.keys})
            return web.Response(status=204, headers={"ETag": self._etag(row)})
        if (problem := self._only_get(request)) is not None:
            return problem
        etag = self._etag(row)
        return self._compressed(
            request,
            json_response(
                {"@odata.context": context + "/$entity", "@odata.etag": etag, **row},
                headers={"ETag": etag},
            ),
        )
