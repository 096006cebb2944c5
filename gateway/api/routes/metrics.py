"""`/metrics`: the gateway's Prometheus metrics (every gateway process on this port)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics_registry or REGISTRY
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
