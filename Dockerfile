# dm image: the dm CLI plus this project's revisions (alembic.ini + data_migrations/).
#
#   docker build -t dm .
#   docker run --rm -e DM_DATABASE_URL=postgresql://user@host/db -e DM_LOG_FORMAT=json dm upgrade heads
#
# Global options (--log-format, --verbose, -c) go before or after the command: `dm
# --log-format=json upgrade heads`; in Kubernetes prefer the environment (DM_LOG_FORMAT=json), as in
# deploy/kubernetes/job.yaml. Exit codes: docs/failures.md, "Exit codes".
#
# BASE_IMAGE is the official python:3.11-slim-bookworm pinned by digest. To refresh the pin:
#   docker pull python:3.11-slim-bookworm
#   docker inspect --format '{{index .RepoDigests 0}}' python:3.11-slim-bookworm
# Dependencies come from requirements/image.txt (hashes checked); refresh it with
# requirements/lock.sh.
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:528257d48c1da0dcecc2e725d1ae34498d60c965f1241e39cd6a85a8859bdf84

# -- build: a venv with dm and its locked dependencies, compiled; no pip in it at the end ------
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first, in a layer of their own: a change of dm's code or docs reuses it.
COPY requirements/image.txt requirements/build.txt requirements/
RUN python -m venv /opt/dm \
 && /opt/dm/bin/pip install --no-cache-dir --no-deps --require-hashes -r requirements/image.txt \
 && python -m venv /opt/build \
 && /opt/build/bin/pip install --no-cache-dir --no-deps --require-hashes -r requirements/build.txt
COPY pyproject.toml README.md ./
COPY src/ src/
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
 && /opt/dm/bin/pip install --no-cache-dir --no-deps --no-index /tmp/wheels/dm-*.whl \
 && /opt/dm/bin/pip uninstall --yes pip setuptools \
 && /opt/dm/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/dm

# -- runtime ---------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG SOURCE_URL=""
ARG REVISION=""
LABEL org.opencontainers.image.title="dm" \
      org.opencontainers.image.description="Data migrations and maintenance scripts, run the way Alembic runs schema revisions" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT"
# tini as PID 1 forwards SIGTERM to dm, which rolls back, records and exits 143.
# The standard library is compiled once here: the image runs as a user who cannot write
# __pycache__, and every start would otherwise compile ~155 modules again.
# HOME exists, owned by uid 10001 and group 0, so that a random uid (OpenShift, group 0)
# can use it too.
# No pip anywhere at run time: the base's system Python loses pip, setuptools, wheel,
# ensurepip and the wheels it bundles (/opt/dm, copied below, has none either).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
 && rm -rf /var/lib/apt/lists/* \
 && rm -rf /usr/share/python-wheels \
 && find /usr/local/bin /usr/bin -maxdepth 1 -name 'pip*' -exec rm -f {} + \
 && find /usr/local/lib /usr/lib -maxdepth 3 -path '*/python3*' \
        \( -name pip -o -name 'pip-*' -o -name setuptools -o -name 'setuptools-*' \
           -o -name wheel -o -name 'wheel-*' -o -name _distutils_hack \
           -o -name distutils-precedence.pth -o -name ensurepip \) \
        -prune -exec rm -rf {} + \
 && python -m compileall -q -j 0 --invalidation-mode unchecked-hash \
        -x '/(test|tests|idle_test|idlelib|tkinter|turtledemo|ensurepip|lib2to3)/' \
        "$(python -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')" \
 && groupadd --gid 10001 dm \
 && useradd --uid 10001 --gid 10001 --home-dir /home/dm --no-create-home \
        --shell /usr/sbin/nologin dm \
 && install -d -o 10001 -g 0 -m 0775 /home/dm
# Unbuffered: log lines must reach `kubectl logs` even if the pod is killed.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/dm \
    PATH=/opt/dm/bin:$PATH
WORKDIR /app
COPY --from=build /opt/dm /opt/dm
COPY alembic.ini ./
COPY data_migrations/ data_migrations/
# Compiled, and the graph cache written: read-only commands (dm check at every pod start)
# then read the revisions' declarations instead of importing every file.
RUN python -m compileall -q --invalidation-mode unchecked-hash data_migrations \
 && dm history > /dev/null
USER 10001:10001
ENTRYPOINT ["tini", "--", "dm"]
CMD ["--help"]
