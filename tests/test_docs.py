"""`/docs` works offline: the page and every asset it loads come from this server."""

from __future__ import annotations

import re

import httpx


async def test_the_docs_page_loads_only_assets_this_server_serves(http: httpx.AsyncClient) -> None:
    page = await http.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    urls += re.findall(r"""url: ?["']([^"']+)["']""", page.text)
    assert urls
    assert [u for u in urls if re.match(r"^(https?:)?//", u)] == [], urls
    assert "validator.swagger.io" not in page.text
    for url in urls:
        asset = await http.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 20, url
    assert "/openapi.json" in urls
    bundle = await http.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith("text/javascript")
    assert (await http.get("/docs/assets/../../secret_key")).status_code == 404
    assert (await http.get("/redoc")).status_code == 404
