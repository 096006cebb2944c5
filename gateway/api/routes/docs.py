"""`/docs` (Swagger UI) and `/redoc` (ReDoc) of the gateway's OpenAPI document, their
scripts and styles served from the package (`static/vendor`): they work without reaching any
other site, and the Content-Security-Policy (`gateway/api/headers.py`) lets the page run only
scripts of this origin — the origin whose dashboard keeps an API key in the browser."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

SWAGGER = "/dashboard/static/vendor/swagger-ui-5.36.0"
REDOC = "/dashboard/static/vendor/redoc-2.5.4"

router = APIRouter(include_in_schema=False)

SWAGGER_PAGE = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>millrace API — Swagger UI</title>
  <link rel="stylesheet" href="{SWAGGER}/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{SWAGGER}/swagger-ui-bundle.js"></script>
  <script src="/dashboard/static/swagger-init.js"></script>
</body>
</html>
"""

REDOC_PAGE = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>millrace API — ReDoc</title>
</head>
<body>
  <redoc spec-url="/openapi.json"></redoc>
  <script src="{REDOC}/redoc.standalone.js"></script>
</body>
</html>
"""


@router.get("/docs")
async def swagger() -> HTMLResponse:
    return HTMLResponse(SWAGGER_PAGE)


@router.get("/redoc")
async def redoc() -> HTMLResponse:
    return HTMLResponse(REDOC_PAGE)
