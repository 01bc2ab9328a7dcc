"""``GET /v1/health``: liveness, version and the write switch. The only route that never needs the token."""

from __future__ import annotations

from fastapi import APIRouter

from featurestore import __version__
from featurestore.http.deps import SettingsDep
from featurestore.http.schemas import HealthOut

router = APIRouter(prefix="/v1", tags=["service"])


@router.get("/health")
def health(settings: SettingsDep) -> HealthOut:
    """Liveness, version and whether writes are enabled (no token needed)."""
    return HealthOut(status="ok", version=__version__, allow_writes=settings.allow_writes)
