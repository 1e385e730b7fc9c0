"""``store.redis`` URLs: one Redis, a Sentinel-watched primary, or a Cluster.

* ``redis://``, ``rediss://``, ``unix://``: one server (redis-py parses these itself);
* ``redis+sentinel://[:password@]host:port[,host:port…]/<service>/<db>``: the sentinels to ask
  for the primary of ``<service>`` (default port 26379);
* ``redis+cluster://[:password@]host:port[,host:port…]``: any nodes of a Cluster, the client
  discovers the rest (default port 6379).

``rediss+sentinel`` and ``rediss+cluster`` speak TLS to every node (and sentinel); the query
may give ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``. The password (URL or
``store.redis_password``) is used for the data nodes and for the sentinels.

Nothing here imports the rest of the broker: the config validates with it, the store connects
with it. Messages never contain the password.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

SINGLE_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
#: Query options taken on a Sentinel or Cluster URL.
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Sentinel or Cluster URL (a single server's URL is left to redis-py)."""

    mode: Literal["sentinel", "cluster"]
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: tuple[tuple[str, str], ...] = ()


def scheme_of(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else ""


def check_redis_url(url: str) -> None:
    """Raise ValueError saying what is wrong with a ``store.redis`` URL."""
    scheme = scheme_of(url)
    if scheme in SINGLE_SCHEMES:
        return
    if scheme in SENTINEL_SCHEMES + CLUSTER_SCHEMES:
        parse_ha_url(url)
        return
    raise ValueError(
        "must be a redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, "
        "redis+cluster:// or rediss+cluster:// URL"
    )


def parse_ha_url(url: str) -> RedisTarget:
    """Parse a ``redis+sentinel://`` or ``redis+cluster://`` URL (ValueError if malformed)."""
    scheme = scheme_of(url)
    if scheme not in SENTINEL_SCHEMES + CLUSTER_SCHEMES:
        raise ValueError(f"not a Sentinel or Cluster URL (scheme {scheme!r})")
    sentinel = scheme in SENTINEL_SCHEMES
    rest = url.split("://", 1)[1]
    if "#" in rest:
        raise ValueError("must not have a #fragment")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    hosts = _hosts(hostlist, 26379 if sentinel else 6379)
    options = _options(query)
    if options and not scheme.startswith("rediss"):
        raise ValueError(f"{options[0][0]} is a TLS option: use rediss+{scheme.split('+')[1]}://")
    segments = [s for s in path.split("/") if s]
    service, db = "", 0
    if sentinel:
        if not segments:
            raise ValueError(
                "a Sentinel URL names the primary's service: "
                "redis+sentinel://host:26379[,host:26379…]/<service>/<db>"
            )
        if len(segments) > 2:
            raise ValueError("a Sentinel URL's path is /<service>/<db>")
        service = unquote(segments[0])
        if len(segments) == 2:
            db = _db(segments[1])
    elif segments:
        if len(segments) > 1 or _db(segments[0]) != 0:
            raise ValueError("a Cluster URL has no database (Cluster has only db 0)")
    return RedisTarget(
        mode="sentinel" if sentinel else "cluster",
        tls=scheme.startswith("rediss"),
        hosts=hosts,
        service=service,
        db=db,
        username=username,
        password=password,
        options=options,
    )


def _hosts(hostlist: str, default_port: int) -> tuple[tuple[str, int], ...]:
    if not hostlist.strip():
        raise ValueError("names no host: give host:port[,host:port…]")
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            raise ValueError("has an empty host in its host list")
        try:
            parts = urlsplit(f"//{item}")
            host, port = parts.hostname, parts.port
        except ValueError:
            raise ValueError(f"has an invalid host:port {item!r}") from None
        if not host:
            raise ValueError(f"has an invalid host:port {item!r}")
        hosts.append((host, port or default_port))
    return tuple(hosts)


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"database must be a number, not {text!r}")
    return int(text)


def _options(query: str) -> tuple[tuple[str, str], ...]:
    options = parse_qsl(query, keep_blank_values=True)
    for name, _ in options:
        if name not in TLS_OPTIONS:
            raise ValueError(
                f"unknown option {name!r} "
                f"(a Sentinel or Cluster URL takes {', '.join(TLS_OPTIONS)})"
            )
    return tuple(options)
