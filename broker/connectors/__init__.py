"""One authenticator per ERP kind, behind :class:`broker.types.Authenticator`."""

from __future__ import annotations

from ..client import Client
from ..config import ConnectorConfig, IfsApps10Config, IfsPsoConfig, InforIonConfig
from ..types import Authenticator, Clock


def build_authenticator(config: ConnectorConfig, http: Client, clock: Clock) -> Authenticator:
    """The authenticator for ``config.type``."""
    if isinstance(config, IfsApps10Config):
        from .ifs_apps10 import IfsApps10Authenticator

        return IfsApps10Authenticator(config, http, clock)
    if isinstance(config, IfsPsoConfig):
        from .ifs_pso import IfsPsoAuthenticator

        return IfsPsoAuthenticator(config, http, clock)
    if isinstance(config, InforIonConfig):
        from .infor_ion import InforIonAuthenticator

        return InforIonAuthenticator(config, http, clock)
    raise TypeError(f"unknown connector type {type(config).__name__}")
