#!/usr/bin/env bash
# Refresh the lock files the image installs from, every package pinned to one version with
# the sha256 of each of its files on the package index:
#   requirements/image.txt   dm's dependencies (from pyproject.toml), in the runtime venv
#   requirements/build.txt   what builds dm's wheel (from requirements/build.in), build stage only
#
#   bash requirements/lock.sh            # re-resolve within pyproject.toml's ranges
#   bash requirements/lock.sh --upgrade  # take the newest versions the ranges allow
#
# Resolve with the Python of the image (3.11, as in the Dockerfile's BASE_IMAGE): markers
# such as python_version are evaluated for the interpreter that runs pip-compile.
set -euo pipefail
cd "$(dirname "$0")/.."
# Resolve from the package index alone: no local pip configuration (find-links, constraints,
# extra indexes), so that every hash in the lock is one the index serves.
unset PIP_FIND_LINKS PIP_CONSTRAINT PIP_EXTRA_INDEX_URL PIP_INDEX_URL
export PIP_CONFIG_FILE=/dev/null
python=${PYTHON:-python3.11}
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$python" -m venv "$tools"
"$tools/bin/pip" install --quiet pip-tools
"$tools/bin/pip-compile" --quiet --generate-hashes --strip-extras --allow-unsafe \
    --no-emit-index-url --no-emit-trusted-host --no-emit-find-links --output-file requirements/image.txt \
    "$@" pyproject.toml
"$tools/bin/pip-compile" --quiet --generate-hashes --strip-extras --allow-unsafe \
    --no-emit-index-url --no-emit-trusted-host --no-emit-find-links \
    --output-file requirements/build.txt "$@" requirements/build.in
