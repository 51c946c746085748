#!/usr/bin/env bash
# Python 3.12 wheels of recforge's dependencies that the GPU machine's image lacks (pydantic, FastAPI, uvicorn,
# Optuna and what they need), downloaded into .whl/ (git-ignored) to be carried there; see docs/gpu.md.
# Versions follow this machine's virtualenv, so the GPU run uses what CI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
names="pydantic pydantic_core annotated-types typing-inspection fastapi starlette annotated-doc uvicorn optuna alembic
SQLAlchemy Mako colorlog greenlet"
pins=$(for n in $names; do .venv/bin/pip show "$n" 2>/dev/null | awk -v n="$n" '/^Version:/{print n "==" $2}' || true; done)
platforms=""
for n in 28 27 24 17; do platforms+=" --platform manylinux_2_${n}_x86_64"; done
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  --platform manylinux2014_x86_64 -d .whl $pins
ls .whl
