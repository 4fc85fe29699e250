"""`memberhub staff create`: the first account, signed in to the console."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.console.support import sign_in
from tests.test_cli import cli_env, last_line, run_cli

__all__ = ["cli_env"]


async def test_staff_create_prints_a_one_time_password_that_signs_in(
    cli_env: dict[str, str | None], browser: httpx.AsyncClient
) -> None:
    result = await run_cli(
        cli_env, "staff", "create", "--email", "Ana@Example.org", "--role", "admin"
    )
    assert result.exit_code == 0, result.output
    assert "stf_" in result.stdout
    password = last_line(result)
    signed_in = await sign_in(browser, "ana@example.org", password)
    assert signed_in.status_code == 303, signed_in.text


async def test_staff_create_takes_a_password_from_a_file(
    cli_env: dict[str, str | None], browser: httpx.AsyncClient, tmp_path: Path
) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text("a long enough passphrase\n")
    result = await run_cli(
        cli_env,
        "staff",
        "create",
        "--email",
        "b@example.org",
        "--role",
        "support_agent",
        "--password-file",
        str(secret_file),
    )
    assert result.exit_code == 0, result.output
    assert "a long enough passphrase" not in result.output
    assert (await sign_in(browser, "b@example.org", "a long enough passphrase")).status_code == 303


async def test_staff_create_fails_cleanly_on_bad_input(cli_env: dict[str, str | None]) -> None:
    for args in (
        ["--email", "c@example.org", "--role", "integration"],
        ["--email", "not-an-email", "--role", "admin"],
        ["--email", "c@example.org", "--role", "admin", "--organisation", "org_missing"],
    ):
        result = await run_cli(cli_env, "staff", "create", *args)
        assert result.exit_code == 1, result.output
        assert "error:" in result.output
    first = await run_cli(cli_env, "staff", "create", "--email", "d@example.org", "--role", "admin")
    assert first.exit_code == 0
    again = await run_cli(cli_env, "staff", "create", "--email", "d@example.org", "--role", "admin")
    assert again.exit_code == 1
    assert "exists" in again.output
