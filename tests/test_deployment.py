"""The container files describe what the README's Production section promises: a non-root
image, and PostgreSQL with a one-off migration, two API processes and two workers. Where
Compose (`docker compose` or `docker-compose`) and a Docker daemon exist, `make docker-check`
also validates and builds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "compose.yaml").read_text()))


def test_the_image_runs_memberhub_as_a_user_without_privileges() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    final_stage = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")) :]
    users = [line.split()[1] for line in final_stage if line.startswith("USER ")]
    assert users, "the final stage sets no USER"
    assert users[-1] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK") for line in final_stage)
    assert 'ENTRYPOINT ["memberhub"]' in final_stage


def test_compose_runs_postgres_a_migration_two_api_processes_and_two_workers() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "migrate", "api", "worker"}
    assert services["migrate"]["command"] == ["db", "upgrade"]
    api = services["api"]
    assert api["command"][api["command"].index("--workers") + 1] == "2"
    assert "--no-worker" in api["command"]
    assert services["worker"]["command"] == ["worker"]
    assert services["worker"]["deploy"]["replicas"] == 2
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["postgres"]["condition"] == "service_healthy"
        environment = services[name]["environment"]
        assert environment["MEMBERHUB_DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert environment["MEMBERHUB_ENV"] == "production"
        assert "${MEMBERHUB_SECRET_KEY:?" in environment["MEMBERHUB_SECRET_KEY"]
