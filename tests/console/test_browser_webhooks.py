"""The webhook and bulk award pages in a real browser: an endpoint registered from the form,
its failed delivery retried, a CSV chosen in the file input and uploaded, the job followed
until the worker is done and its report downloaded; the rows and numbers shown are the
JSON API's, with accessibility basics and a screenshot of every page (tests/console/browser.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, Page
from sqlalchemy import func, select

from memberhub.kit.db import Database
from memberhub.settings import Settings
from memberhub.webhooks.models import DeliveryStatus, WebhookDelivery
from tests.bulk.conftest import BULK, run_worker
from tests.console.browser import DESKTOP, Console, check_page, require_chromium
from tests.console.support import PASSWORD, create_staff_user
from tests.fakes.webhook_receiver import Reply, always, running_receiver
from tests.support import ApiClient
from tests.webhooks.conftest import delivery_loop

require_chromium()

ENDPOINTS = "/api/v1/webhook-endpoints"


async def settle(db: Database, settings: Settings) -> None:
    """The worker's delivery loop, until no delivery is pending (failures final at once)."""
    loop = delivery_loop(db, settings, webhook_poll_seconds=0.01, webhook_retry_schedule="0.01s")
    deadline = time.monotonic() + 15
    while True:
        await loop.run_until_idle(within=15)
        async with db.transaction(read_only=True) as session:
            pending = await session.scalar(
                select(func.count())
                .select_from(WebhookDelivery)
                .where(WebhookDelivery.status == DeliveryStatus.PENDING)
            )
        if not pending:
            return
        assert time.monotonic() < deadline, f"{pending} deliveries still pending"
        await asyncio.sleep(0.02)


async def shown_attempts(page: Page) -> list[str]:
    return [code.strip() for code in await page.locator("td.status-code").all_inner_texts()]


async def sign_in(page: Page, console: Console, email: str) -> None:
    await page.goto(f"{console.url}/console/sign-in")
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_url(f"{console.url}/console")


async def test_webhook_endpoint_registered_and_a_failed_delivery_retried_in_the_browser(
    console: Console, chromium: Browser, db: Database, api: ApiClient, settings: Settings
) -> None:
    await create_staff_user(db, "ada@example.org", role="admin")
    page = await chromium.new_page(viewport=DESKTOP)
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text))
    await sign_in(page, console, "ada@example.org")

    async with running_receiver() as receiver:
        await page.get_by_role("link", name="Webhooks").first.click()
        await check_page(page, console, "webhooks-empty")
        await page.get_by_label("URL", exact=True).fill(receiver.url("crm"))
        await page.get_by_label("Event types").fill("member.created, points.*")
        await page.get_by_label("Description").fill("CRM updates")
        await page.get_by_role("button", name="Register").click()
        secret = (await page.locator("#signing-secret").inner_text()).strip()
        assert secret.startswith("whsec_")
        await check_page(page, console, "webhook-registered")
        [endpoint] = (await api.get(ENDPOINTS)).json()["data"]
        assert (endpoint["url"], endpoint["event_types"]) == (
            receiver.url("crm"),
            ["member.created", "points.*"],
        )

        receiver.set_handler("crm", always(Reply(status=500, body="down")))
        await api.create_member()
        await settle(db, settings)
        await page.get_by_role("link", name="Go to the endpoint").click()
        await check_page(page, console, "webhook-endpoint")
        [failed] = (await api.get(f"{ENDPOINTS}/{endpoint['id']}/deliveries")).json()["data"]
        assert await page.locator(".delivery-status").all_inner_texts() == [failed["status"]]
        assert await shown_attempts(page) == [str(a["status_code"]) for a in failed["attempts"]]
        assert secret not in await page.content()

        receiver.set_handler("crm", None)
        await page.get_by_role("button", name=f"Retry {failed['id']}").click()
        await page.wait_for_selector("text=queued for one more attempt")
        await settle(db, settings)
        await page.reload()
        delivered = (await api.get(f"/api/v1/deliveries/{failed['id']}")).json()
        assert delivered["status"] == "succeeded"
        assert await page.locator(".delivery-status").all_inner_texts() == ["succeeded"]
        assert await shown_attempts(page) == ["500", "500", "200"]
        await check_page(page, console, "webhook-endpoint-after-retry")

    await page.get_by_label("Reason for disabling").fill("Receiver moved")
    await page.get_by_role("button", name="Disable").click()
    await page.wait_for_selector("text=The endpoint is disabled")
    assert "Receiver moved" in await page.locator("#endpoint-state").inner_text()
    assert (await api.get(f"{ENDPOINTS}/{endpoint['id']}")).json()["enabled"] is False
    await check_page(page, console, "webhook-endpoint-disabled")
    await page.get_by_role("link", name="All endpoints").click()
    assert "Receiver moved" in await page.locator("#endpoints").inner_text()
    await check_page(page, console, "webhooks")
    assert errors == []


async def test_bulk_award_uploaded_from_the_file_input_then_followed_and_its_report_downloaded(
    console: Console, chromium: Browser, db: Database, api: ApiClient, tmp_path: Path
) -> None:
    staff_id = await create_staff_user(db, "bo@example.org", role="admin")
    members = [await api.create_member() for _ in range(3)]
    upload = tmp_path / "awards.csv"
    upload.write_text(
        "member_id,points,reason\n"
        + "".join(f"{m['id']},{(i + 1) * 100},Conference\n" for i, m in enumerate(members))
        + "mbr_nobodyhere,5,Ghost\n"
    )
    page = await chromium.new_page(viewport=DESKTOP)
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text))
    await sign_in(page, console, "bo@example.org")

    await page.get_by_role("link", name="Bulk awards").first.click()
    await check_page(page, console, "bulk-awards-empty")
    await page.get_by_label("CSV file").set_input_files(upload)
    await page.get_by_label("Reason for rows that give none").fill("Annual meeting")
    await page.get_by_role("button", name="Upload").click()
    await page.wait_for_selector("text=queued with 4 rows")
    assert await page.locator("#job-status").inner_text() == "queued"
    await check_page(page, console, "bulk-award-queued")
    job_id = page.url.rsplit("/", 1)[1]
    [listed] = (await api.get(BULK)).json()["data"]
    assert (listed["id"], listed["total_rows"], listed["created_by"]) == (job_id, 4, staff_id)

    await run_worker(db)
    await page.reload()
    job: dict[str, Any] = (await api.get(f"{BULK}/{job_id}")).json()
    assert job["status"] == "completed"
    assert await page.locator("#job-status").inner_text() == job["status"]
    assert await page.locator("#job-progress").inner_text() == (
        f"{job['processed_rows']} of {job['total_rows']} ({job['progress_percent']}%)"
    )
    assert await page.locator("#job-applied").inner_text() == str(job["applied_rows"]) == "3"
    assert await page.locator("#job-failed").inner_text() == str(job["failed_rows"]) == "1"
    assert "mbr_nobodyhere" in await page.locator("#failed-rows").inner_text()
    await check_page(page, console, "bulk-award-done")

    async with page.expect_download() as download_info:
        await page.get_by_role("link", name="Download the per-row report (CSV)").click()
    download = await download_info.value
    assert download.suggested_filename == f"{job_id}-rows.csv"
    downloaded = await asyncio.to_thread(Path(await download.path()).read_text)
    assert downloaded == (await api.get(f"{BULK}/{job_id}/rows.csv")).text
    assert len(downloaded.splitlines()) == 5

    await page.get_by_role("link", name="All bulk awards").click()
    assert job_id in await page.locator("#jobs").inner_text()
    await check_page(page, console, "bulk-awards")
    assert errors == []
