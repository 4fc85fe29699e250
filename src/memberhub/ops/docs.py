"""The API's documentation page, Swagger UI, served with its assets from an installed
package (`fastapi-swagger`), so `/docs` works without internet access."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
ASSET_PREFIX = "/docs/assets"


def _asset(name: str) -> bytes:
    return resources.files("fastapi_swagger.resources").joinpath(name).read_bytes()


_router = APIRouter(include_in_schema=False)
_assets: dict[str, bytes] = {}


@_router.get("/docs")
async def _docs(request: Request) -> HTMLResponse:
    app = request.app
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}",
        title=f"{app.title} API",
        swagger_js_url=f"{root}{ASSET_PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSET_PREFIX}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSET_PREFIX}/favicon-32x32.png",
        # No badge from the online validator: the page makes no request elsewhere.
        swagger_ui_parameters={
            "persistAuthorization": True,
            "filter": True,
            "validatorUrl": None,
        },
    )


@_router.get(ASSET_PREFIX + "/{name}")
async def _asset_response(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        return Response(status_code=404)
    if name not in _assets:
        _assets[name] = _asset(name)
    return Response(
        _assets[name], media_type=media_type, headers={"Cache-Control": "public, max-age=86400"}
    )


def install_docs(app: FastAPI) -> None:
    # The routes are made once per process: making them takes longer than the rest of an
    # application's setup.
    app.router.routes.extend(_router.routes)
