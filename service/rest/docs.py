"""``GET /docs``: Swagger UI for the OpenAPI document, served from the files of the installed ``fastapi-offline``
package (Swagger UI 5, which reads the OpenAPI 3.1 that FastAPI writes).

Nothing is loaded from a CDN (the page works offline and a compromised CDN cannot run script here), and the
page's Content-Security-Policy allows script from this origin only, with no inline script.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from starlette.responses import FileResponse, HTMLResponse, Response

from service.errors import error_response
from service.rest.web import STATIC_DIR

router = APIRouter(include_in_schema=False)

SWAGGER_UI = files("fastapi_offline") / "static"  # only its files are used, not its app class
ASSETS = {  # the only files served under /docs/
    "swagger-ui-bundle.js": (SWAGGER_UI / "swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "swagger-ui.css": (SWAGGER_UI / "swagger-ui.css", "text/css; charset=utf-8"),
    "favicon.png": (SWAGGER_UI / "favicon.png", "image/png"),
    "docs.js": (STATIC_DIR / "docs.js", "text/javascript; charset=utf-8"),
}
# Swagger UI draws some icons from data: URLs; everything else comes from this origin (the browser test checks
# that the page renders with nothing blocked).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; font-src 'self'; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>convserve - API docs</title>
<link rel="stylesheet" href="/docs/swagger-ui.css">
<link rel="icon" href="/docs/favicon.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/docs.js"></script>
</body>
</html>
"""


@router.get("/docs")
async def docs() -> Response:
    return HTMLResponse(PAGE, headers=SECURITY_HEADERS)


@router.get("/docs/{name}")
async def docs_asset(name: str) -> Response:
    asset = ASSETS.get(name)
    if asset is None:
        return error_response(404, f"no docs file {name!r}")
    path, media_type = asset
    return FileResponse(path, media_type=media_type, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})
