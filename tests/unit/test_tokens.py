"""TokenManager: single flight, classification, pauses, persistence — with a fake ERP."""

from __future__ import annotations

import asyncio
import base64

import orjson
import pytest
from multidict import CIMultiDict

from broker.credential import Token, jwt_expiry, token_from_oauth
from broker.errors import (
    AuthFailed,
    ConnectorUnavailable,
    CredentialsRejected,
    RefreshRejected,
    TokenEndpointError,
)
from broker.metrics import Metrics
from broker.stores import MemoryStore
from broker.tokens import TokenManager, TokenPolicy


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeAuth:
    """An authenticator whose token endpoint the test scripts, call by call."""

    login_grant = "password"

    def __init__(self, clock: FakeClock, lifetime: float = 300.0) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None
        self.login_error: Exception | None = None
        self.refresh_error: Exception | None = None
        self.revoked: list[Token] = []
        self.started = asyncio.Event()

    def _token(self, grant: str) -> Token:
        n = len(self.calls) - 1
        now = self.clock()
        return Token(
            access=f"access-token-{n}",
            refresh=f"refresh-token-{n}",
            obtained_at=now,
            expires_at=now + self.lifetime,
            grant=grant,
        )

    async def _call(self, grant: str, error: Exception | None) -> Token:
        self.calls.append(grant)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if error is not None:
            raise error
        return self._token(grant)

    async def login(self) -> Token:
        return await self._call("password", self.login_error)

    async def refresh(self, token: Token) -> Token:
        return await self._call("refresh_token", self.refresh_error)

    async def revoke(self, token: Token) -> None:
        self.revoked.append(token)

    def apply(self, headers: CIMultiDict[str], token: Token) -> None:
        headers["Authorization"] = f"Bearer {token.access}"


def make_manager(
    auth: FakeAuth, clock: FakeClock, store: MemoryStore | None = None, **policy: float
) -> tuple[TokenManager, MemoryStore, Metrics]:
    store = store or MemoryStore()
    metrics = Metrics()
    manager = TokenManager(
        "erp",
        auth,
        store,
        "erp:fp",
        metrics,
        policy=TokenPolicy(**{"token_timeout": 2.0, **policy}),  # type: ignore[arg-type]
        clock=clock,
    )
    return manager, store, metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class TestSingleFlight:
    async def test_concurrent_callers_share_one_token_request(self) -> None:
        """100 callers with no token cause exactly one login; all get the same token."""
        clock = FakeClock()
        auth = FakeAuth(clock)
        auth.gate = asyncio.Event()
        manager, _, metrics = make_manager(auth, clock)
        callers = [asyncio.create_task(manager.get()) for _ in range(100)]
        await auth.started.wait()
        auth.gate.set()
        tokens = await asyncio.gather(*callers)
        assert auth.calls == ["password"]
        assert {t.access for t in tokens} == {"access-token-0"}
        assert sample(metrics, "erp_broker_token_refresh_waiters_total", connector="erp") == 99

    async def test_cancelled_waiter_does_not_cancel_the_request(self) -> None:
        """The first caller giving up leaves the token request running for the others."""
        clock = FakeClock()
        auth = FakeAuth(clock)
        auth.gate = asyncio.Event()
        manager, _, _ = make_manager(auth, clock)
        first = asyncio.create_task(manager.get())
        await auth.started.wait()
        second = asyncio.create_task(manager.get())
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        auth.gate.set()
        token = await second
        assert token.access == "access-token-0"
        assert auth.calls == ["password"]

    async def test_waiters_share_a_failure(self) -> None:
        """When the one token request fails, every waiter gets the failure (auth_failed)."""
        clock = FakeClock()
        auth = FakeAuth(clock)
        auth.gate = asyncio.Event()
        auth.login_error = TokenEndpointError("the token endpoint answered 503")
        manager, _, _ = make_manager(auth, clock)
        callers = [asyncio.create_task(manager.get()) for _ in range(10)]
        await auth.started.wait()
        auth.gate.set()
        results = await asyncio.gather(*callers, return_exceptions=True)
        assert all(isinstance(r, AuthFailed) for r in results)
        assert auth.calls == ["password"]

    async def test_slow_token_endpoint_gives_auth_failed_within_the_timeout(self) -> None:
        """A token request that hangs answers auth_failed after token_timeout, never hangs."""
        clock = FakeClock()
        auth = FakeAuth(clock)
        auth.gate = asyncio.Event()  # never set
        manager, _, _ = make_manager(auth, clock, token_timeout=0.2)
        with pytest.raises(AuthFailed, match=r"within 0\.2s"):
            await manager.get()


class TestRejection:
    async def test_reject_of_current_token_refreshes_once(self) -> None:
        """A burst of 401s for the same token causes one refresh; all get the new token."""
        clock = FakeClock()
        auth = FakeAuth(clock)
        manager, _, _ = make_manager(auth, clock)
        old = await manager.get()
        auth.gate = asyncio.Event()
        auth.started.clear()
        tasks = [asyncio.create_task(manager.reject(old)) for _ in range(20)]
        await auth.started.wait()
        auth.gate.set()
        new = await asyncio.gather(*tasks)
        assert auth.calls == ["password", "refresh_token"]
        assert {t.access for t in new} == {"access-token-1"}

    async def test_reject_of_a_superseded_token_returns_the_current_one(self) -> None:
        """A late 401 for an old token does not throw away the newer one."""
        clock = FakeClock()
        auth = FakeAuth(clock)
        manager, _, _ = make_manager(auth, clock)
        old = await manager.get()
        new = await manager.reject(old)
        again = await manager.reject(old)
        assert again is new
        assert auth.calls == ["password", "refresh_token"]

    async def test_rejected_refresh_token_falls_back_to_login(self) -> None:
        """RefreshRejected leads to a password login in the same token request."""
        clock = FakeClock()
        auth = FakeAuth(clock)
        manager, _, metrics = make_manager(auth, clock)
        old = await manager.get()
        auth.refresh_error = RefreshRejected("refresh token rejected (400 invalid_grant)")
        new = await manager.reject(old)
        assert auth.calls == ["password", "refresh_token", "password"]
        assert new.grant == "password"
        assert (
            sample(
                metrics,
                "erp_broker_token_requests_total",
                connector="erp",
                grant="refresh_token",
                outcome="failure",
            )
            == 1
        )

    async def test_rejected_credentials_pause_logins(self) -> None:
        """Wrong credentials: first auth_failed, then connector_unavailable without new logins."""
        clock = FakeClock()
        auth = FakeAuth(clock)
        auth.login_error = CredentialsRejected("credentials rejected: check username and password")
        manager, _, metrics = make_manager(auth, clock, login_pause_initial=60.0)
        with pytest.raises(AuthFailed, match="rejected"):
            await manager.get()
        for _ in range(5):
            with pytest.raises(ConnectorUnavailable, match="paused"):
                await manager.get()
        assert auth.calls == ["password"]
        assert sample(metrics, "erp_broker_login_paused", connector="erp") == 1
        assert sample(metrics, "erp_broker_connector_up", connector="erp") == 0
        assert manager.status()["token_state"] == "paused"

    async def test_transient_failure_keeps_serving_the_valid_token(self) -> None:
        """While the token is valid, a failing refresh does not affect requests."""
        clock = FakeClock()
        auth = FakeAuth(clock, lifetime=100)
        manager, _, _ = make_manager(auth, clock)
        token = await manager.get()
        auth.refresh_error = TokenEndpointError("the token endpoint answered 503")
        auth.login_error = TokenEndpointError("the token endpoint answered 503")
        clock.now += 85  # past the refresh-ahead point, before expiry
        with pytest.raises(AuthFailed):
            await manager.refresh_now()
        assert await manager.get() is token

    async def test_expired_token_is_never_returned(self) -> None:
        """Once expired and unrefreshable, get() fails fast instead of returning it."""
        clock = FakeClock()
        auth = FakeAuth(clock, lifetime=100)
        manager, _, _ = make_manager(auth, clock)
        await manager.get()
        auth.refresh_error = TokenEndpointError("down")
        auth.login_error = TokenEndpointError("down")
        clock.now += 101
        with pytest.raises(AuthFailed):
            await manager.get()
        # The next caller inside the backoff gets auth_failed at once, with no new request.
        calls = len(auth.calls)
        with pytest.raises(AuthFailed, match="next try"):
            await manager.get()
        assert len(auth.calls) == calls


class TestPersistence:
    async def test_new_token_is_saved_before_use(self) -> None:
        """The store holds the token by the time a caller receives it."""
        clock = FakeClock()
        auth = FakeAuth(clock)
        manager, store, _ = make_manager(auth, clock)
        token = await manager.get()
        stored = await store.load("erp:fp")
        assert stored is not None and stored.access == token.access
        assert stored.refresh == token.refresh

    async def test_valid_stored_token_is_used_without_login(self) -> None:
        """start() adopts a persisted, unexpired token."""
        clock = FakeClock()
        store = MemoryStore()
        await store.save(
            "erp:fp",
            Token(
                access="stored-access",
                obtained_at=clock(),
                expires_at=clock() + 300,
                grant="password",
            ),
        )
        auth = FakeAuth(clock)
        manager, _, _ = make_manager(auth, clock, store=store)
        await manager.start()
        try:
            assert (await manager.get()).access == "stored-access"
            assert auth.calls == []
        finally:
            await manager.stop()

    async def test_expired_stored_token_uses_its_refresh_token(self) -> None:
        """After a crash, the newest refresh token is used: no password login."""
        clock = FakeClock()
        store = MemoryStore()
        await store.save(
            "erp:fp",
            Token(
                access="old",
                refresh="newest-refresh",
                obtained_at=clock() - 400,
                expires_at=clock() - 100,
                grant="refresh_token",
            ),
        )
        auth = FakeAuth(clock)
        manager, _, _ = make_manager(auth, clock, store=store)
        await manager.start()
        try:
            await manager.get()
            assert auth.calls == ["refresh_token"]
        finally:
            await manager.stop()

    async def test_revoke_on_shutdown_only_when_configured(self) -> None:
        """stop(revoke=True) revokes only with revoke_on_shutdown and an unshared store."""
        clock = FakeClock()
        auth = FakeAuth(clock)
        manager, store, _ = make_manager(auth, clock, revoke_on_shutdown=False)
        await manager.get()
        await manager.stop(revoke=True)
        assert auth.revoked == []
        manager, store, _ = make_manager(auth, clock, revoke_on_shutdown=True)
        await manager.get()
        await manager.stop(revoke=True)
        assert len(auth.revoked) == 1
        assert await store.load("erp:fp") is None


class TestRefreshAhead:
    async def test_background_refresh_before_expiry(self) -> None:
        """With a 1 s lifetime, the background loop refreshes before expiry, unasked."""
        auth_clock = FakeClock()
        import time

        auth_clock.now = time.time()
        auth = FakeAuth(auth_clock, lifetime=1.0)

        class Real(FakeClock):
            def __call__(self) -> float:
                return time.time()

        clock = Real()
        auth.clock = clock
        manager, _, _ = make_manager(auth, clock)
        await manager.start()
        try:
            first = await manager.get()
            auth.started.clear()
            async with asyncio.timeout(3):
                while manager.current is first:
                    await asyncio.sleep(0.05)
            assert auth.calls[:2] == ["password", "refresh_token"]
            assert manager.current is not None
            assert not manager.current.expired(time.time())
        finally:
            await manager.stop()


class TestTokenParsing:
    def test_expires_in_wins(self) -> None:
        """expires_in sets the lifetime."""
        token = token_from_oauth(
            {
                "access_token": "a" * 10,
                "expires_in": 180,
                "refresh_token": "r" * 10,
                "refresh_expires_in": 1800,
            },
            grant="password",
            now=1000.0,
            default_lifetime=300,
        )
        assert token.expires_at == 1180.0 and token.refresh_expires_at == 2800.0
        assert token.lifetime_source == "expires_in"

    def test_jwt_exp_when_expires_in_is_missing(self) -> None:
        """Without expires_in, the JWT exp claim is used."""
        payload = base64.urlsafe_b64encode(orjson.dumps({"exp": 4242})).rstrip(b"=").decode()
        jwt = f"eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln"
        assert jwt_expiry(jwt) == 4242.0
        token = token_from_oauth(
            {"access_token": jwt}, grant="password", now=1000.0, default_lifetime=300
        )
        assert token.expires_at == 4242.0 and token.lifetime_source == "jwt"

    def test_default_lifetime_last(self) -> None:
        """An opaque token without expires_in gets the configured default lifetime."""
        token = token_from_oauth(
            {"access_token": "opaque-token"}, grant="password", now=10.0, default_lifetime=300
        )
        assert token.expires_at == 310.0 and token.lifetime_source == "default"

    @pytest.mark.parametrize("body", [None, {}, {"access_token": ""}, {"access_token": 5}, [1]])
    def test_body_without_token_is_transient(self, body: object) -> None:
        """An empty or tokenless 200 is a transient failure, not a crash."""
        with pytest.raises(TokenEndpointError):
            token_from_oauth(body, grant="password", now=0, default_lifetime=300)

    def test_refresh_without_rotation_keeps_the_refresh_token(self) -> None:
        """A refresh answer without refresh_token keeps the previous one."""
        previous = Token(
            access="a1", refresh="r-keep", obtained_at=0, expires_at=10, grant="password"
        )
        token = token_from_oauth(
            {"access_token": "a2", "expires_in": 60},
            grant="refresh_token",
            now=5,
            default_lifetime=300,
            previous=previous,
        )
        assert token.refresh == "r-keep"

    def test_repr_hides_the_token(self) -> None:
        """repr(Token) never shows the access or refresh token."""
        token = Token(
            access="secret-access-value",
            refresh="secret-refresh-value",
            obtained_at=0,
            expires_at=1,
            grant="password",
        )
        assert "secret" not in repr(token)
