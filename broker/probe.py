"""Connection tests: a fresh credential from the config, then one call to the ERP's check endpoint.

Used by ``erp-broker test-connection`` and ``POST /connectors/<name>/test``. Never the broker's
cached token: the point is to prove that the configured secrets work now. Every failure says
what to fix (the secret, the account id, the host, the CA file, the check path).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict
from yarl import URL

from .client import Failure, Observer, TransportError
from .config import INFOR_CHECK_PATH, ConnectorConfig, IfsApps10Config, IfsPsoConfig
from .connectors import build_authenticator
from .credential import Token
from .direct import FreshCredentials, direct_client
from .errors import CredentialsRejected, TokenError

LOGIN, CHECK = "login", "check"
#: The check endpoint's answer is read to its end (only its status counts): a project listing
#: of a large IFS instance runs to some MiB.
CHECK_LIMIT = 64 * 1024 * 1024


def check_url(config: ConnectorConfig) -> str:
    """The URL whose 2xx answer proves a credential works for API calls."""
    if isinstance(config, IfsPsoConfig):
        return config.session_url()  # GET with apiKey: the session check
    base = config.upstream_base().rstrip("/")
    if isinstance(config, IfsApps10Config):
        return f"{base}/{config.test_path.lstrip('/')}"
    return f"{base}/{INFOR_CHECK_PATH}"


def _short(url: str) -> str:
    last = URL(url, encoded=True).path.rstrip("/").rsplit("/", 1)[-1]
    return f".../{last}"


@dataclass(slots=True)
class ProbeResult:
    connector: str
    type: str
    ok: bool
    stage: str  # where it stopped: "login" or "check"
    message: str
    check_url: str
    token_ms: float | None = None
    check_status: int | None = None
    check_ms: float | None = None
    warnings: list[str] = field(default_factory=list)
    #: What was done, one line per step (`test-connection -v`): URLs and statuses, no secret.
    steps: list[str] = field(default_factory=list)
    #: Why the login failed (``invalid_credentials``, ``account_disabled``, ...), else None.
    cause: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "connector": self.connector,
            "type": self.type,
            "ok": self.ok,
            "stage": self.stage,
            "cause": self.cause,
            "message": self.message,
            "token_ms": self.token_ms,
            "check": {
                "method": "GET",
                "url": self.check_url,
                "status": self.check_status,
                "ms": self.check_ms,
            },
            "warnings": self.warnings,
            "steps": self.steps,
        }


_NOT_FOUND_HINTS = {
    "ifs_apps10": "test_path and domain/base_url",
    "ifs_pso": "domain/base_url and session_path",
    "infor_ion": "the .ionapi file's iu/ti (and tenant_in_path)",
}


def _check_failure(config: ConnectorConfig, status: int) -> str:
    what = f"the check endpoint {URL(check_url(config), encoded=True).path} answered {status}"
    if status == 401:
        return (
            f"{what}: the ERP refused the credential it had just issued; check that domain/"
            "base_url points at the same system as the token endpoint"
        )
    if status == 403:
        return f"{what}: the account is authenticated but lacks a role or scope for this path"
    if status == 404:
        hint = _NOT_FOUND_HINTS[config.type]
        return f"{what}: check {hint}"
    return what


def _recorder(result: ProbeResult, phase: list[str]) -> Observer:
    """Records every HTTP exchange of a probe as a step (the URL without its query), named
    after ``phase[0]``; a failure names the phase of the exchange that failed."""

    def record(method: str, url: str, outcome: int | Failure) -> None:
        if isinstance(outcome, Failure):
            shown = f"{outcome.phase} failed: {outcome.what}"
        else:
            shown = str(outcome)
        result.steps.append(f"{phase[0]}: {method} {url} -> {shown}")

    return record


def _lifetime(token: Token) -> str:
    if token.expires_at is None:
        return "token: no lifetime given"
    lifetime = token.expires_at - token.obtained_at
    refresh = "with" if token.refresh else "without"
    source = token.lifetime_source
    return f"token: lifetime {lifetime:.0f}s (from {source}), {refresh} refresh token"


async def probe(name: str, config: ConnectorConfig) -> ProbeResult:
    """Log in afresh, call the check endpoint, give back what was obtained."""
    url = check_url(config)
    result = ProbeResult(name, config.type, False, LOGIN, "", url)
    if not config.tls_verify:
        result.warnings.append(f"tls_verify is false: {URL(url).host}'s certificate is not checked")
    phase = [LOGIN]
    with direct_client(config, observer=_recorder(result, phase)) as client:
        authenticator = build_authenticator(config, client, time.time)
        credentials = FreshCredentials(authenticator, timeout=config.token_timeout)
        try:
            started = time.perf_counter()
            try:
                token = await credentials.login()
            except CredentialsRejected as exc:
                result.message, result.cause = f"login rejected: {exc}", exc.cause
                return result
            except TokenError as exc:
                result.message, result.cause = f"login failed: {exc}", exc.cause
                return result
            result.token_ms = round((time.perf_counter() - started) * 1000, 1)
            result.steps.append(_lifetime(token))
            result.stage = phase[0] = CHECK
            headers: CIMultiDict[str] = CIMultiDict({"Accept": "application/json"})
            authenticator.apply(headers, token)
            started = time.perf_counter()
            try:
                async with asyncio.timeout(config.timeout):
                    answer = await client.fetch(
                        "GET", url, headers.items(), limit=CHECK_LIMIT, encoded=True
                    )
            except TimeoutError:
                result.message = f"the check endpoint did not answer within {config.timeout:g}s"
                return result
            except TransportError as exc:
                result.message = exc.failure.describe("the check endpoint")
                return result
            result.check_status = answer.status
            result.check_ms = round((time.perf_counter() - started) * 1000, 1)
            status = result.check_status
            if not 200 <= status < 300:
                result.message = _check_failure(config, status)
                return result
            result.ok = True
            result.message = (
                f"token obtained in {result.token_ms:.0f} ms; GET {_short(url)} -> {status}"
            )
            return result
        finally:
            phase[0] = "logout"
            await credentials.close()
