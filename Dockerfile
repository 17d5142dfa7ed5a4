# dm image: the dm CLI plus this project's revisions (alembic.ini + data_migrations/).
# Run as a Kubernetes Job with e.g. args: ["upgrade", "heads", "--log-format=json"] and
# DM_DATABASE_URL from a Secret.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src/ src/
RUN python -m venv /opt/dm \
 && /opt/dm/bin/pip install --no-cache-dir --no-compile . \
 && /opt/dm/bin/python -m compileall -q /opt/dm

FROM python:3.12-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 dm \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin dm
# Unbuffered: log lines must reach `kubectl logs` even if the pod is killed.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/dm/bin:$PATH
WORKDIR /app
COPY --from=build /opt/dm /opt/dm
COPY alembic.ini ./
COPY data_migrations/ data_migrations/
USER 10001:10001
# tini as PID 1 forwards SIGTERM to dm, which rolls back, records and exits 143.
ENTRYPOINT ["tini", "--", "dm"]
CMD ["--help"]
