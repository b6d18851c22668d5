"""e-CPS login through Pro Santé Connect (the gateway's single authlib client adapter)."""

from gateway.authn.ecps.client import (
    EcpsError,
    EcpsLogin,
    LogoutRequest,
    ProSanteConnect,
    ProviderState,
    ProviderStatus,
)

__all__ = ["EcpsError", "EcpsLogin", "LogoutRequest", "ProSanteConnect", "ProviderState", "ProviderStatus"]
