"""IfsApps10Sim behaves like Keycloak (IFS IAM) and IFS OData per erp-protocols.md."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import aiohttp
import orjson
import pytest
import yarl

from broker.sandbox import IfsApps10Sim, jwt_claims

TOKEN_PATH = "/auth/realms/ifsapps/protocol/openid-connect/token"
API = "/main/ifsapplications/projection/v1"


async def post_token(http: aiohttp.ClientSession, sim: IfsApps10Sim, form: dict[str, str], **kw):
    async with http.post(sim.url + kw.pop("path", TOKEN_PATH), data=form, **kw) as response:
        return response.status, await response.json(content_type=None)


class TestIfsApps10SimKeycloak:
    async def test_password_grant_answers_keycloak_fields(self, ifs, http, ifs_form) -> None:
        """The password grant answers exactly Keycloak's fields with IFS's sample lifetimes."""
        status, body = await post_token(http, ifs, ifs_form)
        assert status == 200
        assert list(body) == [
            "access_token",
            "expires_in",
            "refresh_expires_in",
            "refresh_token",
            "token_type",
            "id_token",
            "not-before-policy",
            "session_state",
            "scope",
        ]
        assert (body["expires_in"], body["refresh_expires_in"], body["token_type"]) == (
            180,
            1800,
            "Bearer",
        )
        assert body["scope"].split() == ["openid", "microprofile-jwt", "profile", "email"]
        assert jwt_claims(body["refresh_token"])["typ"] == "Refresh"
        assert jwt_claims(body["id_token"])["aud"] == "erp-broker"
        assert jwt_claims(body["access_token"])["session_state"] == body["session_state"]

    async def test_no_id_token_without_openid_scope(self, ifs, http, ifs_form) -> None:
        """Like Keycloak, an id_token only comes with scope=openid."""
        status, body = await post_token(http, ifs, ifs_form | {"scope": ""})
        assert status == 200 and "id_token" not in body and body["scope"] == "profile email"

    async def test_client_may_authenticate_with_basic(self, ifs, http, ifs_form, basic) -> None:
        """Client credentials are also accepted as HTTP Basic."""
        form = {k: v for k, v in ifs_form.items() if not k.startswith("client_")}
        status, _ = await post_token(
            http, ifs, form, headers=basic(ifs.client_id, ifs.client_secret)
        )
        assert status == 200

    async def test_bad_user_credentials_are_401_invalid_grant(self, ifs, http, ifs_form) -> None:
        """Wrong password → 401 invalid_grant "Invalid user credentials"; usernames ignore case."""
        status, body = await post_token(http, ifs, ifs_form | {"password": "nope"})
        assert (status, body) == (
            401,
            {"error": "invalid_grant", "error_description": "Invalid user credentials"},
        )
        status, _ = await post_token(http, ifs, ifs_form | {"username": "ifsapp"})
        assert status == 200
        ifs.password = "rotated"
        status, _ = await post_token(http, ifs, ifs_form)
        assert status == 401

    async def test_bad_client_is_401(self, ifs, http, ifs_form) -> None:
        """Unknown client → 401 invalid_client; wrong client secret → 401 unauthorized_client."""
        status, body = await post_token(http, ifs, ifs_form | {"client_id": "other"})
        assert (status, body["error"]) == (401, "invalid_client")
        status, body = await post_token(http, ifs, ifs_form | {"client_secret": "wrong"})
        assert (status, body["error"]) == (401, "unauthorized_client")

    async def test_request_errors_are_400(self, ifs, http, ifs_form) -> None:
        """Unknown grant → unsupported_grant_type; no grant or a JSON body → invalid_request."""
        status, body = await post_token(
            http, ifs, ifs_form | {"grant_type": "client_credentials_x"}
        )
        assert (status, body["error"]) == (400, "unsupported_grant_type")
        status, body = await post_token(
            http, ifs, {k: v for k, v in ifs_form.items() if k != "grant_type"}
        )
        assert (status, body) == (
            400,
            {"error": "invalid_request", "error_description": "Missing form parameter: grant_type"},
        )
        async with http.post(ifs.url + TOKEN_PATH, json=ifs_form) as response:
            assert (response.status, (await response.json())["error"]) == (400, "invalid_request")

    async def test_wrong_realm_is_404(self, ifs, http, ifs_form) -> None:
        """A realm that does not exist → 404 {"error": "Realm does not exist"}."""
        path = "/auth/realms/other/protocol/openid-connect/token"
        assert await post_token(http, ifs, ifs_form, path=path) == (
            404,
            {"error": "Realm does not exist"},
        )

    async def test_refresh_without_rotation_keeps_old_refresh_token(
        self, ifs, http, ifs_form
    ) -> None:
        """Without rotation a refresh gives new tokens and the old refresh token still works."""
        _, first = await post_token(http, ifs, ifs_form)
        refresh = ifs_form | {
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
        }
        status, second = await post_token(http, ifs, refresh)
        assert status == 200 and second["refresh_token"] != first["refresh_token"]
        assert second["session_state"] == first["session_state"]
        status, _ = await post_token(http, ifs, refresh)
        assert status == 200
        assert ifs.count_token_requests("refresh_token") == 2

    async def test_rotation_kills_the_used_refresh_token(self, http, ifs_form) -> None:
        """With rotate_refresh a used refresh token → 400 invalid_grant "Token is not active"."""
        async with IfsApps10Sim(rotate_refresh=True) as ifs:
            _, first = await post_token(http, ifs, ifs_form)
            used = ifs_form | {
                "grant_type": "refresh_token",
                "refresh_token": first["refresh_token"],
            }
            status, second = await post_token(http, ifs, used)
            assert status == 200
            assert await post_token(http, ifs, used) == (
                400,
                {"error": "invalid_grant", "error_description": "Token is not active"},
            )
            newest = used | {"refresh_token": second["refresh_token"]}
            assert (await post_token(http, ifs, newest))[0] == 200

    async def test_refresh_token_expires(self, ifs, http, ifs_form, clock) -> None:
        """A refresh token older than refresh_lifetime, or unknown, is "Token is not active"."""
        ifs.clock = clock
        _, tokens = await post_token(http, ifs, ifs_form)
        clock.advance(1800)
        refresh = ifs_form | {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
        }
        assert (await post_token(http, ifs, refresh))[0] == 400
        assert (await post_token(http, ifs, refresh | {"refresh_token": "x.y.z"}))[0] == 400

    async def test_omit_expires_in_leaves_the_jwt_exp(self, http, ifs_form) -> None:
        """omit_expires_in drops expires_in; the JWT still carries exp."""
        async with IfsApps10Sim(omit_expires_in=True, token_lifetime=60) as ifs:
            _, body = await post_token(http, ifs, ifs_form)
        assert "expires_in" not in body
        claims = jwt_claims(body["access_token"])
        assert claims["exp"] - claims["iat"] == 60

    async def test_logout_ends_the_session(self, ifs, http, ifs_form) -> None:
        """POST …/logout with the refresh token → 204; the grant's tokens die; grant "logout"."""
        _, tokens = await post_token(http, ifs, ifs_form)
        form = {
            "client_id": ifs.client_id,
            "client_secret": ifs.client_secret,
            "refresh_token": tokens["refresh_token"],
        }
        async with http.post(
            f"{ifs.url}/auth/realms/ifsapps/protocol/openid-connect/logout", data=form
        ) as response:
            assert response.status == 204
        assert ifs.revocations == [tokens["refresh_token"]]
        assert ifs.count_token_requests("logout") == 1
        async with http.get(
            f"{ifs.url}{API}/CustomerHandling.svc/",
            headers={"Authorization": f"Bearer {tokens['access_token']}"},
        ) as response:
            assert response.status == 401

    async def test_revoke_endpoint(self, ifs, http, ifs_form, basic) -> None:
        """POST …/revoke (RFC 7009) kills the token given; grant "revoke"."""
        _, tokens = await post_token(http, ifs, ifs_form)
        path = "/auth/realms/ifsapps/protocol/openid-connect/revoke"
        client = basic(ifs.client_id, ifs.client_secret)
        async with http.post(
            ifs.url + path, data={"token": tokens["refresh_token"]}, headers=client
        ) as response:
            assert response.status == 200
        refresh = ifs_form | {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
        }
        assert (await post_token(http, ifs, refresh))[0] == 400
        assert [r.grant for r in ifs.token_requests] == ["password", "revoke", "refresh_token"]

    async def test_native_provider_and_discovery(self, ifs, http, ifs_form) -> None:
        """The Native Apps 10 provider grants like Keycloak; its discovery names that endpoint."""
        status, body = await post_token(
            http, ifs, ifs_form, path="/openid-connect-provider/idp/token"
        )
        assert status == 200 and body["token_type"] == "Bearer"
        async with http.get(
            f"{ifs.url}/openid-connect-provider/.well-known/openid-configuration"
        ) as response:
            doc = await response.json()
        assert doc["token_endpoint"] == f"{ifs.url}/openid-connect-provider/idp/token"
        async with http.get(
            f"{ifs.url}/auth/realms/ifsapps/.well-known/openid-configuration"
        ) as response:
            assert (await response.json())["token_endpoint"] == ifs.url + TOKEN_PATH


class TestIfsApps10SimOData:
    @pytest.fixture
    async def bearer(self, ifs, login):
        return await login(ifs)

    async def get(self, http, url, headers, **kw):
        async with http.get(url, headers=headers, **kw) as response:
            return response.status, response.headers, await response.read()

    async def test_missing_or_expired_token_is_401_with_challenge(
        self, ifs, http, login, clock
    ) -> None:
        """No token, or an expired one → 401, WWW-Authenticate: Bearer, an OData error body."""
        url = f"{ifs.url}{API}/CustomerHandling.svc/CustomerInfoSet"
        async with http.get(url) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="ifsapps"'
            assert (await response.json())["error"]["code"] == "ODP_UNAUTHORIZED"
        ifs.clock = clock
        expiring = await login(ifs)
        clock.advance(180)
        async with http.get(url, headers=expiring) as response:
            assert response.status == 401
            assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]

    async def test_token_expires_after_its_lifetime(self, http, clock, login) -> None:
        """An access token works until expires_in seconds have passed, then 401."""
        async with IfsApps10Sim() as ifs:
            ifs.clock = clock
            bearer = await login(ifs)
            url = f"{ifs.url}{API}/CustomerHandling.svc/"
            clock.advance(179)
            assert (await self.get(http, url, bearer))[0] == 200
            clock.advance(1)
            assert (await self.get(http, url, bearer))[0] == 401

    async def test_projection_list(self, ifs, http, bearer) -> None:
        """AllProjections.svc/Projections is an OData collection of Name + Description."""
        status, _, body = await self.get(
            http, f"{ifs.url}{API}/AllProjections.svc/Projections", bearer
        )
        value = orjson.loads(body)["value"]
        assert status == 200
        assert {p["Name"] for p in value} >= {
            "CustomerHandling",
            "PurchaseOrderHandling",
            "WorkOrderHandling",
        }
        assert all(p["Description"] for p in value)

    async def test_entity_set_and_encoded_key(self, ifs, http, bearer) -> None:
        """A set answers {"@odata.context", "value"}; a key like '10%2F7' is decoded to 10/7."""
        base = f"{ifs.url}{API}/CustomerHandling.svc"
        status, _, body = await self.get(http, f"{base}/CustomerInfoSet", bearer)
        collection = orjson.loads(body)
        assert status == 200 and collection["@odata.context"].endswith("$metadata#CustomerInfoSet")
        assert "10/7" in [row["CustomerId"] for row in collection["value"]]
        url = yarl.URL(f"{base}/CustomerInfoSet(CustomerId='10%2F7')", encoded=True)
        status, headers, body = await self.get(http, url, bearer)
        entity = orjson.loads(body)
        assert (status, entity["CustomerId"], entity["Name"]) == (200, "10/7", "Nordic Tools AB")
        assert headers["ETag"] == entity["@odata.etag"]
        short = yarl.URL(f"{base}/CustomerInfoSet('ACME')", encoded=True)
        assert (await self.get(http, short, bearer))[0] == 200
        numeric = f"{ifs.url}{API}/WorkOrderHandling.svc/ActiveSeparateSet(WoNo=1001)"
        assert orjson.loads((await self.get(http, numeric, bearer))[2])["WoNo"] == 1001

    async def test_query_options_and_unknowns(self, ifs, http, bearer) -> None:
        """$top and $select shape the answer; unknown projection, set or key → 404 ODP_NOT_FOUND."""
        base = f"{ifs.url}{API}/CustomerHandling.svc"
        url = yarl.URL(f"{base}/CustomerInfoSet?$top=1&$select=Name", encoded=True)
        (row,) = orjson.loads((await self.get(http, url, bearer))[2])["value"]
        assert set(row) == {"@odata.etag", "Name"}
        for missing in (
            f"{ifs.url}{API}/NoSuchHandling.svc/X",
            f"{base}/NoSet",
            f"{base}/CustomerInfoSet('nobody')",
        ):
            status, _, body = await self.get(http, missing, bearer)
            assert (status, orjson.loads(body)["error"]["code"]) == (404, "ODP_NOT_FOUND")

    async def test_create_update_delete(self, ifs, http, bearer) -> None:
        """POST adds an entity (201), PATCH changes it (204), DELETE removes it (204)."""
        set_url = f"{ifs.url}{API}/PurchaseOrderHandling.svc/PurchaseOrderSet"
        async with http.post(
            set_url, headers=bearer, json={"OrderNo": "P9", "VendorNo": "V1"}
        ) as response:
            assert response.status == 201
        async with http.post(set_url, headers=bearer, json={"OrderNo": "P9"}) as response:
            assert response.status == 400
        key_url = yarl.URL(f"{set_url}(OrderNo='P9')", encoded=True)
        async with http.patch(key_url, headers=bearer, json={"VendorNo": "V2"}) as response:
            assert response.status == 204
        assert orjson.loads((await self.get(http, key_url, bearer))[2])["VendorNo"] == "V2"
        async with http.delete(key_url, headers=bearer) as response:
            assert response.status == 204
        assert (await self.get(http, key_url, bearer))[0] == 404

    async def test_openapi_v3_and_v2(self, ifs, http, bearer) -> None:
        """$openapi is OpenAPI 3.0.1 (each operation has summary, operationId); ?V2 Swagger 2.0."""
        url = f"{ifs.url}{API}/CustomerHandling.svc/$openapi"
        doc = orjson.loads((await self.get(http, url, bearer))[2])
        assert doc["openapi"] == "3.0.1" and doc["info"]["title"] == "CustomerHandling"
        assert doc["servers"] == [{"url": f"{ifs.url}{API}/CustomerHandling.svc"}]
        operations = [(m, p, op) for p, item in doc["paths"].items() for m, op in item.items()]
        assert {m for m, _, _ in operations} == {"get", "post", "patch", "delete"}
        assert all(op["summary"] and op["operationId"] for _, _, op in operations)
        assert "/CustomerInfoSet(CustomerId='{CustomerId}')" in doc["paths"]
        v2 = orjson.loads((await self.get(http, url + "?V2", bearer))[2])
        assert v2["swagger"] == "2.0" and v2["basePath"] == f"{API}/CustomerHandling.svc"
        assert v2["paths"].keys() == doc["paths"].keys()

    async def test_metadata_is_edmx(self, ifs, http, bearer) -> None:
        """$metadata is an EDMX document naming the entity sets and their keys."""
        status, headers, body = await self.get(
            http, f"{ifs.url}{API}/CustomerHandling.svc/$metadata", bearer
        )
        assert status == 200 and headers["Content-Type"].startswith("application/xml")
        ns = {"edm": "http://docs.oasis-open.org/odata/ns/edm"}
        root = ET.fromstring(body)
        assert root.find(".//edm:EntitySet", ns).get("Name") == "CustomerInfoSet"
        assert root.find(".//edm:PropertyRef", ns).get("Name") == "CustomerId"

    async def test_wrong_method_is_405(self, ifs, http, bearer) -> None:
        """Documents are read-only: POST $metadata → 405 with an OData error."""
        async with http.post(
            f"{ifs.url}{API}/CustomerHandling.svc/$metadata", headers=bearer
        ) as response:
            assert response.status == 405
            assert (await response.json())["error"]["code"] == "ODP_METHOD_NOT_ALLOWED"
