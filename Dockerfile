# memberhub: `docker build -t memberhub .`; see compose.yaml and README "Production".
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY src ./src
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MEMBERHUB_DATA_DIR=/var/lib/memberhub
COPY --from=build /install /usr/local
# pg_dump and pg_restore, for `memberhub backup` against PostgreSQL (15, as compose.yaml runs).
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --home-dir /var/lib/memberhub --create-home memberhub
USER memberhub
WORKDIR /var/lib/memberhub
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["memberhub"]
# On its own (`docker run -p 8000:8000 -v memberhub-data:/var/lib/memberhub memberhub`): the
# embedded SQLite database in the volume, migrated at start, with the embedded worker.
# compose.yaml runs PostgreSQL, a migration, API processes and workers instead.
CMD ["serve", "--upgrade", "--host", "0.0.0.0", "--port", "8000"]
