"""Redis: the store a fleet of replicas shares, and the coordinator that makes it one client.

Keys (``<key>`` is the manager's ``<connector>:<credential fingerprint>``; ``{<c>}`` is its
connector, a hash tag: every key of one connector lives in one Cluster hash slot, so the
scripts below, which touch the token and the lock together, run on Redis Cluster too)::

    erp-broker:{<c>}:token:<key>    the token, sealed with the Codec (associated data = <key>)
    erp-broker:{<c>}:blob:<key>     cached documents (discovered OpenAPI)
    erp-broker:{<c>}:lock:<key>     the refresh lock: a lease (PX) whose value is a random fence
    erp-broker:{<c>}:window:<name>  a Retry-After window: exists (PX) while the ERP said "wait"
    erp-broker:{<c>}:budget:<name>  the rate_limit log: a sorted set of Redis-clock timestamps
    erp-broker:events               pub/sub channel: a <key> whose token was saved or lock freed
    erp-broker:windows              pub/sub channel: "<ms> <name>", a window just set or extended

Before the hash tags, tokens lived at ``erp-broker:token:<key>``: on a single server or a
Sentinel primary (where such keys can exist) a token is read from both names and the newer
one taken, so an upgrade never loses the fleet's (possibly rotated) refresh token.

Sentinel and Cluster: redis-py's clients find the primary (``Sentinel.master_for``) or the
node of a slot (``RedisCluster``). A token is saved with ``WAIT 1`` on the same connection
when the primary has replicas, so a failover right after a rotation does not lose it; a
replica that does not acknowledge in time is logged and counted, and the token used anyway.
A failover looks like a short outage (below): the store follows the new primary when the
probe reaches it.

Single flight across the fleet: the replica that wins ``SET NX PX`` refreshes while a task
renews its lease; the others wait for the release notification (or poll, bounded by the
lease's remaining time) and then find the new token in the store. Only the owner of a fence
can renew or release the lock, or save under it. A Retry-After window is pushed to every
replica as it is set (and read from Redis on every (re)subscription), so waiting it out costs
a request no Redis call. Windows travel as durations and the budget uses Redis's ``TIME``, so
replicas whose clocks disagree still share one quota.

Redis unavailable: every call is bounded by ``store.timeout``; the first failure marks the
store down (one log line, ``erp_broker_store_up`` 0, ``/readyz`` detail) and from then on no
request waits for Redis: locks, windows and budgets are local, tokens are served from memory.
A probe brings the store back up, first writing this replica's newest tokens where Redis lost
them or holds older ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from ..config import DEFAULT_LOCK_LEASE, StoreConfig, mask_url_password
from ..coordinator import LocalCoordinator
from ..credential import Token
from ..crypto import Codec
from ..errors import EncryptionKeyError, StoreError
from ..redis_url import (
    CLUSTER_SCHEMES,
    SENTINEL_SCHEMES,
    RedisTarget,
    parse_ha_url,
    scheme_of,
)
from ..secrets import register
from ..types import Coordinator, TokenStore

if TYPE_CHECKING:
    from ..metrics import Metrics

log = structlog.get_logger("broker.stores.redis")

T = TypeVar("T")

PREFIX = "erp-broker"
CHANNEL = f"{PREFIX}:events"
WINDOWS = f"{PREFIX}:windows"
#: Longest a lock waiter sleeps between attempts when no release notification arrives.
LOCK_POLL = 0.25
#: How often a store that is down is probed.
PROBE_INTERVAL = 0.5
#: How often an idle replica checks that Redis still answers (requests need not touch it).
HEARTBEAT = 5.0
#: A Cluster client's first contact (topology discovery) may take this many store timeouts.
CONNECT_TIMEOUTS = 3
#: Tokens checked against the encryption key at start (there is one per connector).
KEY_CHECK_LIMIT = 1000

#: Errors that mean "Redis is not there" (as opposed to a bad command or a bad value): a
#: Cluster that cannot serve the slot, a former primary now read-only, are that too.
_UNAVAILABLE = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ClusterError,
    redis_errors.RedisClusterException,
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
    OSError,
    TimeoutError,
)

# SET NX PX; on failure the lock's remaining lease (ms, at least 1) so a waiter knows how long
# a dead owner can hold it.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 1 then return 1 end
return ttl
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""
# Save a token unless another replica owns the refresh lock now: its token will be newer.
_SAVE = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
# Extend a window (never shorten it) and push it to every replica: "<ms> <name>".
_EXTEND_WINDOW = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
  redis.call('PUBLISH', ARGV[2], ARGV[1] .. ' ' .. ARGV[3])
end
return 1
"""
# A sliding-window log: at most ARGV[1] entries younger than ARGV[2] ms. Returns 0 (taken)
# or the ms until the oldest entry that keeps the budget spent leaves the window.
_TAKE_BUDGET = """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local n = redis.call('ZCARD', KEYS[1])
if n < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window))
  return 0
end
local edge = redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')
return math.max(1, math.ceil(tonumber(edge[2]) + window - now))
"""


class StoreUnavailable(StoreError):
    """Redis did not answer (or the store is known to be down): callers fall back."""


class RedisRefused(StoreUnavailable):
    """Redis answered but refused our credentials: a startup error, an outage later."""


def _key(kind: str, key: str) -> str:
    """``erp-broker:{<connector>}:<kind>:<key>``: one hash slot per connector."""
    return f"{PREFIX}:{{{key.split(':', 1)[0]}}}:{kind}:{key}"


def _legacy_key(kind: str, key: str) -> str:
    """The name before hash tags (read on a single server so an upgrade loses no token)."""
    return f"{PREFIX}:{kind}:{key}"


def _pattern(kind: str) -> str:
    return f"{PREFIX}:{{*}}:{kind}:*"


def _key_in(name: str, kind: str) -> str:
    """The ``<key>`` of a name made by :func:`_key`."""
    return name.partition(f"}}:{kind}:")[2]


def _certificate_rejected(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


Client = Redis | RedisCluster


class Connection:
    """The client redis-py gives for a ``store.redis`` URL, with what else must be closed."""

    def __init__(self, client: Client, mode: str, extra: tuple[Redis, ...] = ()) -> None:
        self.client = client
        self.mode = mode  # "single", "sentinel" or "cluster"
        self.extra = extra

    @classmethod
    def from_config(cls, config: StoreConfig) -> Connection:
        """Build (not connect) the client; ValueError/RedisError for a URL redis-py refuses."""
        assert config.redis is not None
        options: dict[str, Any] = {
            "socket_timeout": config.timeout,
            "socket_connect_timeout": config.timeout,
            # One immediate retry replaces a pooled connection that died with a restarted
            # server; anything longer is our own timeout's business.
            "retry": Retry(NoBackoff(), 1),
        }
        password = None if config.redis_password is None else config.redis_password.get()
        if scheme_of(config.redis) not in SENTINEL_SCHEMES + CLUSTER_SCHEMES:
            if password is not None:
                options["password"] = password
            # Keeps the idle pub/sub connection alive through proxies and load balancers.
            client = Redis.from_url(config.redis, health_check_interval=30, **options)
            given = client.connection_pool.connection_kwargs.get("password")
            if given:
                register(str(given))
            return cls(client, "single")
        target = parse_ha_url(config.redis)
        password = password if password is not None else target.password
        if password:
            register(password)
            options["password"] = password
        if target.username:
            options["username"] = target.username
        options.update(_tls_options(target))
        if target.mode == "cluster":
            nodes = [ClusterNode(host, port) for host, port in target.hosts]
            return cls(RedisCluster(startup_nodes=nodes, **options), "cluster")
        sentinel_options = {k: v for k, v in options.items() if k != "retry"}
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(target.hosts), sentinel_kwargs=sentinel_options, **options
        )
        client = sentinel.master_for(target.service, db=target.db, health_check_interval=30)
        return cls(client, "sentinel", tuple(sentinel.sentinels))

    async def aclose(self) -> None:
        await self.client.aclose()
        for extra in self.extra:
            await extra.aclose()


def _tls_options(target: RedisTarget) -> dict[str, Any]:
    if not target.tls:
        return {}
    return {"ssl": True, **dict(target.options)}


class RedisStore:
    """Tokens in Redis, shared by every replica that uses the same credentials."""

    def __init__(
        self,
        connection: Connection,
        codec: Codec,
        *,
        url: str,
        timeout: float = 2.0,
        lock_lease: float = DEFAULT_LOCK_LEASE,
        metrics: Metrics | None = None,
    ) -> None:
        self._connection = connection
        self._client: Client = connection.client
        self._cluster = isinstance(connection.client, RedisCluster)
        self._metrics = metrics
        client = connection.client
        self._codec = codec
        self._timeout = timeout
        self.url = mask_url_password(url)
        self._up = True
        self._down_since: float | None = None
        self.last_error: str | None = None
        self._is_up, self._is_down = asyncio.Event(), asyncio.Event()
        self._is_up.set()
        #: The newest token this process saved or loaded per key: written back on resync.
        self._latest: dict[str, Token] = {}
        self._probe: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._closed = False
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                ("acquire", _ACQUIRE),
                ("renew", _RENEW),
                ("release", _RELEASE),
                ("save", _SAVE),
                ("window", _EXTEND_WINDOW),
                ("budget", _TAKE_BUDGET),
            )
        }
        self.coordinator = RedisCoordinator(self, lock_lease)

    # -- opening and closing --------------------------------------------------------------

    @classmethod
    async def open(
        cls, config: StoreConfig, codec: Codec, metrics: Metrics | None = None
    ) -> RedisStore:
        """Connect and check the encryption key; an unreachable Redis starts the store down
        (the broker serves and logs in locally until Redis answers), bad credentials or a
        wrong key are startup errors."""
        assert config.redis is not None
        try:
            connection = Connection.from_config(config)
        except (ValueError, redis_errors.RedisError) as exc:
            raise StoreError(f"store.redis: {exc}") from None
        store = cls(
            connection,
            codec,
            url=config.redis,
            timeout=config.timeout,
            lock_lease=config.lock_lease,
            metrics=metrics,
        )
        try:
            await store._connect()
            await store._check_key()
        except RedisRefused:
            await store.close()
            raise
        except StoreUnavailable as exc:
            store._mark_down(str(exc))
        except BaseException:
            await store.close()
            raise
        if not codec.encrypted:
            log.warning(
                "store_unencrypted",
                store="redis",
                message="tokens in Redis are not encrypted (set store.encryption_key)",
            )
        store._listener = asyncio.create_task(store._listen(), name="redis-events")
        log.info("store_opened", store="redis", mode=connection.mode, url=store.url, up=store._up)
        return store

    async def _check_key(self) -> None:
        """Open the stored tokens: a different key is a startup error, as with SQLite."""
        for name in await self._call("scan", partial(self._scan, _pattern("token"))):
            await self._read(_key_in(name, "token"))

    async def _scan(self, pattern: str, limit: int = KEY_CHECK_LIMIT) -> list[str]:
        """Names matching ``pattern`` (on every primary of a Cluster), at most ``limit``."""
        names: list[str] = []
        async for name in self._client.scan_iter(match=pattern, count=100):
            names.append(_text(name))
            if len(names) >= limit:
                break
        return names

    async def close(self) -> None:
        self._closed = True
        tasks = {t for t in (self._probe, self._listener) if t is not None and not t.done()}
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: redis-py may take a cancel for its own read timeout; the loops then end
            # on _closed within one read timeout.
            await asyncio.wait(tasks, timeout=self._timeout + 1.0)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._timeout):
                await self._connection.aclose()

    # -- health ---------------------------------------------------------------------------

    @property
    def shared(self) -> bool:
        return True

    @property
    def up(self) -> bool:
        return self._up

    def status(self) -> dict[str, Any]:
        """For ``/readyz`` and ``/connectors``: never the URL's password."""
        return {
            "type": "redis",
            "mode": self._connection.mode,
            "up": self._up,
            "url": self.url,
            "down_since": self._down_since,
            "last_error": self.last_error,
        }

    async def wait_state(self, up: bool) -> None:
        """Return once the store is up (or down); for the listener and for tests."""
        await (self._is_up if up else self._is_down).wait()

    def _set_state(self, up: bool) -> None:
        self._up = up
        (self._is_up if up else self._is_down).set()
        (self._is_down if up else self._is_up).clear()

    def _mark_down(self, error: str) -> None:
        self.last_error = error
        if not self._up or self._closed:
            return
        self._set_state(False)
        self._down_since = time.time()
        log.error(
            "store_down",
            store="redis",
            url=self.url,
            error=error,
            message="Redis is unavailable: serving with the tokens held; single flight, "
            "rate-limit windows and budgets are local until it returns",
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._recover(), name="redis-probe")

    async def _recover(self) -> None:
        while not self._closed:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await self._connect()
                await self._resync()
            except StoreUnavailable as exc:
                self.last_error = str(exc)
                continue
            except StoreError as exc:  # answered, but not as it should: retry, never give up
                self.last_error = str(exc)
                log.warning("store_resync_failed", store="redis", error=str(exc))
                continue
            down_for = time.time() - (self._down_since or time.time())
            self._set_state(True)
            self._down_since = None
            log.info("store_up", store="redis", url=self.url, down_seconds=round(down_for, 1))
            return

    async def _resync(self) -> None:
        """Write back the tokens this replica holds where Redis has none or older ones
        (Redis restarted empty, or tokens were obtained while it was away)."""
        for key, token in list(self._latest.items()):
            fence = await self.coordinator.try_lock(key)
            if fence is None:
                continue  # someone refreshes right now: theirs will be the newest
            try:
                stored = await self._read(key)
                if stored is None or stored.obtained_at < token.obtained_at:
                    await self._write(key, token, fence)
                    log.info("store_resynchronised", store="redis", connector=key.split(":")[0])
            except EncryptionKeyError as exc:
                log.error("store_resync_failed", store="redis", error=str(exc))
            finally:
                await self.coordinator.unlock(key, fence)

    # -- calls ----------------------------------------------------------------------------

    async def _connect(self) -> None:
        """Reach Redis (at start and from the probe). A Cluster client first learns the
        topology (a few round trips to several nodes): that gets a few store timeouts, so a
        loaded machine does not keep the store down; then one PING within the store timeout."""
        if isinstance(self._client, RedisCluster):
            await self._call("connect", self._client.initialize, CONNECT_TIMEOUTS * self._timeout)
        await self._call("ping", self._client.ping)

    async def _call(
        self, op: str, command: Callable[[], Awaitable[T]], timeout: float | None = None
    ) -> T:
        """One Redis call within the store timeout; StoreUnavailable if Redis is not there."""
        try:
            async with asyncio.timeout(timeout or self._timeout):
                return await command()
        except (redis_errors.AuthenticationError, redis_errors.AuthorizationError) as exc:
            raise RedisRefused(
                f"store.redis: Redis refused the connection ({type(exc).__name__}): check "
                "store.redis_password or the URL's user and password"
            ) from None
        except _UNAVAILABLE as exc:
            if _certificate_rejected(exc):
                raise RedisRefused(
                    "store.redis: the Redis server's TLS certificate was not verified: give its "
                    "CA as ?ssl_ca_certs=/path/ca.pem on the rediss:// URL"
                ) from None
            reason = str(exc) or f"no answer within {self._timeout:g}s"
            raise StoreUnavailable(f"redis {op}: {type(exc).__name__}: {reason}") from None
        except redis_errors.RedisError as exc:
            raise StoreError(f"redis {op}: {exc}") from None

    async def run(self, op: str, command: Callable[[], Awaitable[T]]) -> T:
        """A call on the request path: refused at once while the store is down."""
        if not self._up:
            raise StoreUnavailable(f"redis {op}: the store is down ({self.last_error})")
        try:
            return await self._call(op, command)
        except StoreUnavailable as exc:
            self._mark_down(str(exc))
            raise

    async def get_value(self, name: str) -> Any:
        """GET ``name`` on the request path (for the coordinator's small shared values)."""
        return await self.run("get", partial(self._client.get, name))

    async def set_value(self, name: str, value: bytes | None, ttl: float) -> None:
        """SET ``name`` for ``ttl`` seconds, or DEL it when ``value`` is None."""
        client = self._client
        command = (
            partial(client.delete, name)
            if value is None
            else partial(client.set, name, value, px=max(1, round(ttl * 1000)))
        )
        await self.run("set", command)

    async def script(
        self, name: str, keys: list[str], args: list[Any], *, while_down: bool = False
    ) -> Any:
        """Run one of the store's Lua scripts; ``while_down`` tries Redis even when the store
        is marked down (the probe's resynchronisation)."""
        script = self._scripts[name]
        call = self._call if while_down else self.run
        return await call(name, lambda: script(keys=keys, args=args))

    async def open_windows(self) -> list[tuple[str, float]]:
        """The Retry-After windows open now: (name, seconds left)."""
        windows = []
        for name in await self._call("scan", partial(self._scan, _pattern("window"))):
            ttl = int(await self._call("pttl", partial(self._client.pttl, name)))
            if ttl > 0:
                windows.append((_key_in(name, "window"), ttl / 1000))
        return windows

    async def _read(self, key: str) -> Token | None:
        if self._cluster:
            sealed = await self._call("get", lambda: self._client.get(_key("token", key)))
            return None if sealed is None else self._open(key, sealed)
        names = [_key("token", key), _legacy_key("token", key)]
        values = await self._call("get", lambda: self._client.mget(names))
        tokens = [self._open(key, value) for value in values if value is not None]
        return max(tokens, key=lambda t: t.obtained_at, default=None)

    def _open(self, key: str, sealed: bytes | str) -> Token:
        return Token.from_json(self._codec.open(_bytes(sealed), key.encode()))

    async def _write(self, key: str, token: Token, fence: str) -> bool:
        """Save unless another replica holds the lock; then, when the primary has replicas,
        wait (bounded) until one has it too."""
        sealed = self._codec.seal(token.to_json(), key.encode())
        keys = [_key("token", key), _key("lock", key)]
        args: list[Any] = [sealed, fence, CHANNEL, key]
        if not await self._call("role", partial(self._replicas, keys[0])):
            script = self._scripts["save"]
            return bool(await self._call("save", lambda: script(keys=keys, args=args)))
        saved, acknowledged = await self._call("save", partial(self._save_and_wait, keys, args))
        if saved and not acknowledged:
            connector = key.split(":", 1)[0]
            log.warning(
                "store_replication_unacknowledged",
                store="redis",
                connector=connector,
                message=f"no replica acknowledged the new token within "
                f"{self._wait_ms}ms: a failover now would lose it",
            )
            if self._metrics is not None:
                self._metrics.store_replication_unacknowledged.labels(connector).inc()
        return bool(saved)

    @property
    def _wait_ms(self) -> int:
        """How long a save waits for a replica: half the store timeout (the call's bound)."""
        return max(1, round(self._timeout * 500))

    def _node_of(self, name: str) -> dict[str, Any]:
        """``target_nodes`` for a keyless command that must run where ``name`` lives."""
        if isinstance(self._client, RedisCluster):
            return {"target_nodes": self._client.get_node_from_key(name)}
        return {}

    async def _replicas(self, name: str) -> int:
        """How many replicas the primary holding ``name`` has (``ROLE``)."""
        role = await self._client.execute_command("ROLE", **self._node_of(name))
        if _text(role[0]) != "master":
            return 0
        return len(role[2])

    async def _save_and_wait(self, keys: list[str], args: list[Any]) -> tuple[int, int]:
        """The save script and ``WAIT 1`` on one connection (WAIT counts the acknowledgements
        of this connection's writes): (saved, replicas that acknowledged)."""
        pipe = self._client.pipeline(transaction=False)
        pipe.eval(_SAVE, len(keys), *keys, *args)
        pipe.execute_command("WAIT", 1, self._wait_ms, **self._node_of(keys[0]))
        saved, acknowledged = await pipe.execute()
        return int(saved), int(acknowledged)

    # -- TokenStore -------------------------------------------------------------------------

    async def load(self, key: str) -> Token | None:
        if not self._up:
            raise StoreUnavailable(f"redis get: the store is down ({self.last_error})")
        try:
            token = await self._read(key)
        except StoreUnavailable as exc:
            self._mark_down(str(exc))
            raise
        if token is not None:
            latest = self._latest.get(key)
            if latest is None or latest.obtained_at <= token.obtained_at:
                self._latest[key] = token
        return token

    async def save(self, key: str, token: Token) -> None:
        # Kept even if the write fails: resync writes it once Redis is back.
        self._latest[key] = token
        if not self._up:
            raise StoreUnavailable(f"redis save: the store is down ({self.last_error})")
        try:
            saved = await self._write(key, token, self.coordinator.fence_of(key))
        except StoreUnavailable as exc:
            self._mark_down(str(exc))
            raise
        if not saved:
            raise StoreError(
                "another replica holds the refresh lock (this replica's lease ran out): "
                "its token is newer, this one is used by this replica only"
            )

    async def delete(self, key: str) -> None:
        self._latest.pop(key, None)
        await self.run("delete", lambda: self._client.delete(_key("token", key)))

    async def get_blob(self, key: str) -> bytes | None:
        value = await self.run("get", lambda: self._client.get(_key("blob", key)))
        return None if value is None else _bytes(value)

    async def put_blob(self, key: str, value: bytes) -> None:
        await self.run("set", lambda: self._client.set(_key("blob", key), value))

    # -- notifications ------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Wake lock waiters when a token is saved or a lock released, take in windows other
        replicas set; reconnect as needed."""
        while not self._closed:
            if not self._up:
                await self.wait_state(True)
                continue
            pubsub = self._client.pubsub()
            try:
                await self._call("subscribe", partial(pubsub.subscribe, CHANNEL, WINDOWS))
                await self.coordinator.load_windows()
                heartbeat = time.monotonic() + HEARTBEAT
                while self._up and not self._closed:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if time.monotonic() >= heartbeat:
                        await self.run("ping", self._client.ping)
                        heartbeat = time.monotonic() + HEARTBEAT
                    if message is None or message.get("type") != "message":
                        continue
                    data = _text(message["data"])
                    if _text(message["channel"]) == WINDOWS:
                        milliseconds, _, name = data.partition(" ")
                        await self.coordinator.window_pushed(name, int(milliseconds) / 1000)
                    else:
                        self.coordinator.notify(data)
            except StoreUnavailable as exc:
                self._mark_down(str(exc))
            except (*_UNAVAILABLE, redis_errors.RedisError) as exc:
                # A lost subscription is a lost (or restarted, emptied) server: probe it and
                # resynchronise. Lock waiters poll meanwhile.
                self._mark_down(f"redis events: {type(exc).__name__}: {exc}")
            except StoreError as exc:
                log.warning("store_events_failed", store="redis", error=str(exc))
                await asyncio.sleep(PROBE_INTERVAL)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]


class RedisCoordinator:
    """Refresh lock, Retry-After windows and request budget, shared through Redis; local
    (as :class:`~broker.coordinator.LocalCoordinator`) while Redis is down."""

    def __init__(
        self, store: RedisStore, lease: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._lease_ms = max(1, round(lease * 1000))
        self._clock = clock
        self._local = LocalCoordinator(clock)
        self._held: dict[str, str] = {}
        self._wakeups: dict[str, asyncio.Event] = {}

    @property
    def lease(self) -> float:
        return self._lease_ms / 1000

    # -- the refresh lock -------------------------------------------------------------------

    def fence_of(self, key: str) -> str:
        """The fence of the lock this process holds for ``key`` ("" when it holds none)."""
        return self._held.get(key, "")

    def notify(self, key: str) -> None:
        event = self._wakeups.pop(key, None)
        if event is not None:
            event.set()

    @contextlib.asynccontextmanager
    async def refresh_lock(self, key: str) -> AsyncIterator[None]:
        fence = await self._acquire(key)
        if fence is None:
            # Redis is down: the TokenManager's own single flight is the lock.
            yield
            return
        renewal = asyncio.create_task(self._renew(key, fence), name=f"lease-{key.split(':')[0]}")
        try:
            yield
        finally:
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal
            if self._store.up:  # else the lease runs out: never wait for a lost Redis here
                await self.unlock(key, fence)
            else:
                self._held.pop(key, None)

    async def _acquire(self, key: str) -> str | None:
        """Wait for the lock: a fence when held, None when Redis is down (go local)."""
        while self._store.up:
            # Registered before trying, so a release between the try and the wait is seen.
            wakeup = self._wakeups.setdefault(key, asyncio.Event())
            fence = secrets.token_hex(16)
            try:
                remaining = await self._store.script(
                    "acquire", [_key("lock", key)], [fence, self._lease_ms]
                )
            except StoreError:
                return None
            if remaining == 0:
                self._held[key] = fence
                return fence
            # A live owner releases (notification); a dead one's lease runs out.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(LOCK_POLL, int(remaining) / 1000)):
                    await wakeup.wait()
        return None

    async def try_lock(self, key: str) -> str | None:
        """Take the lock if it is free (resync); None otherwise. Works while marked down."""
        fence = secrets.token_hex(16)
        remaining = await self._store.script(
            "acquire", [_key("lock", key)], [fence, self._lease_ms], while_down=True
        )
        if remaining != 0:
            return None
        self._held[key] = fence
        return fence

    async def _renew(self, key: str, fence: str) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                renewed = await self._store.script(
                    "renew", [_key("lock", key)], [fence, self._lease_ms]
                )
            except StoreError:
                continue  # down: the save is refused if another replica took over meanwhile
            if not renewed:
                log.warning("refresh_lock_lost", connector=key.split(":")[0])
                return

    async def unlock(self, key: str, fence: str) -> None:
        if self._held.get(key) == fence:
            del self._held[key]
        with contextlib.suppress(StoreError):
            await self._store.script(
                "release", [_key("lock", key)], [fence, CHANNEL, key], while_down=True
            )

    # -- windows and budgets -----------------------------------------------------------------

    async def wait_window(self, key: str) -> float:
        # Local: every window set anywhere in the fleet was pushed here as it was set.
        return await self._local.wait_window(key)

    def window_open(self, key: str) -> bool:
        return self._local.window_open(key)

    async def set_window(self, key: str, until: float) -> None:
        await self._local.set_window(key, until)
        milliseconds = round((until - self._clock()) * 1000)
        if milliseconds <= 0 or not self._store.up:
            return
        with contextlib.suppress(StoreError):
            await self._store.script("window", [_key("window", key)], [milliseconds, WINDOWS, key])

    async def window_pushed(self, key: str, seconds: float) -> None:
        await self._local.set_window(key, self._clock() + seconds)

    async def load_windows(self) -> None:
        """The windows open now (on start, and after Redis was away)."""
        for name, seconds in await self._store.open_windows():
            await self.window_pushed(name, seconds)

    async def take_budget(self, key: str, requests: int, per_seconds: float) -> float:
        if self._store.up:
            try:
                wait_ms = await self._store.script(
                    "budget",
                    [_key("budget", key)],
                    [requests, per_seconds * 1000, secrets.token_hex(8)],
                )
            except StoreError:
                pass
            else:
                return int(wait_ms) / 1000
        return await self._local.take_budget(key, requests, per_seconds)

    # -- the login governor's state (broker/governor.py) ------------------------------------

    async def login_state(self, key: str) -> bytes | None:
        """The fleet's login spacing for ``key``; this replica's own while Redis is down."""
        if self._store.up:
            try:
                value = await self._store.get_value(_key("login", key))
            except StoreError:
                pass
            else:
                return None if value is None else _bytes(value)
        return await self._local.login_state(key)

    async def set_login_state(self, key: str, value: bytes | None, ttl: float) -> None:
        await self._local.set_login_state(key, value, ttl)
        with contextlib.suppress(StoreError):
            await self._store.set_value(_key("login", key), value, ttl)


if TYPE_CHECKING:

    def _conforms(store: RedisStore) -> tuple[TokenStore, Coordinator]:
        return store, store.coordinator
