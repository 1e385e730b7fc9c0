"""nginx configs for the benchmark: the origin and the header-injecting reverse proxy.

Both run as the current user from a temporary prefix (``-p``), in the foreground
(``daemon off``), one worker each, logging nothing per request.
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path

_COMMON = """\
{user}worker_processes 1;
daemon off;
pid {prefix}/{name}.pid;
error_log {prefix}/{name}-error.log warn;
events {{ worker_connections 16384; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp-{name}/body;
    proxy_temp_path {prefix}/tmp-{name}/proxy;
    fastcgi_temp_path {prefix}/tmp-{name}/fastcgi;
    uwsgi_temp_path {prefix}/tmp-{name}/uwsgi;
    scgi_temp_path {prefix}/tmp-{name}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
{body}
}}
"""

_ORIGIN = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {prefix}/www;
        # ~20 B of JSON that echoes the credential it received.
        location = /small {{
            default_type application/json;
            return 200 '{{"auth":"$http_authorization"}}';
        }}
        location / {{ default_type application/octet-stream; }}
    }}"""

#: The same origin over TLS, with a throwaway CA's certificate. One log line per new
#: connection (its first request), so the benchmark counts TLS handshakes, not requests.
_ORIGIN_TLS = """\
    map $connection_requests $erp_bench_first {{ 1 1; default 0; }}
    log_format handshakes '$connection $ssl_session_reused $ssl_protocol';
    ssl_session_cache shared:SSL:10m;
    ssl_session_timeout 1h;
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        access_log {prefix}/handshakes.log handshakes if=$erp_bench_first;
        root {prefix}/www;
        location = /small {{
            default_type application/json;
            return 200 '{{"auth":"$http_authorization"}}';
        }}
        location / {{ default_type application/octet-stream; }}
    }}"""

_PROXY = """\
    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 256;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "{authorization}";
            proxy_buffer_size 64k;
            proxy_buffers 16 64k;
            proxy_max_temp_file_size 0;
        }}
    }}"""


def _user() -> str:
    # As root, workers would drop to "nobody" and lose access to the private prefix.
    return f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""


def write_config(prefix: Path, name: str, body: str) -> Path:
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / f"tmp-{name}" / sub).mkdir(parents=True, exist_ok=True)
    path = prefix / f"{name}.conf"
    path.write_text(_COMMON.format(user=_user(), prefix=prefix, name=name, body=body))
    return path


#: nginx as a TLS client of the origin: verified against the throwaway CA, sessions reused,
#: connections kept alive (what a well-configured nginx in front of an HTTPS ERP does).
_PROXY_TLS = """\
    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 256;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass https://origin;
            proxy_ssl_trusted_certificate {ca_file};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "{authorization}";
            proxy_buffer_size 64k;
            proxy_buffers 16 64k;
            proxy_max_temp_file_size 0;
        }}
    }}"""


def origin_config(
    prefix: Path,
    port: int,
    *,
    tls_port: int | None = None,
    cert: Path | None = None,
    key: Path | None = None,
) -> Path:
    body = _ORIGIN.format(port=port, prefix=prefix)
    if tls_port is not None:
        body += "\n" + _ORIGIN_TLS.format(port=tls_port, prefix=prefix, cert=cert, key=key)
    return write_config(prefix, "origin", body)


def proxy_config(
    prefix: Path, port: int, origin_port: int, authorization: str, *, ca_file: Path | None = None
) -> Path:
    if ca_file is None:
        body = _PROXY.format(port=port, origin_port=origin_port, authorization=authorization)
        return write_config(prefix, "nginx-proxy", body)
    body = _PROXY_TLS.format(
        port=port, origin_port=origin_port, authorization=authorization, ca_file=ca_file
    )
    return write_config(prefix, "nginx-proxy-tls", body)


def argv(prefix: Path, config: Path) -> list[str]:
    return ["nginx", "-p", str(prefix), "-c", str(config), "-e", f"{prefix}/nginx-stderr.log"]
