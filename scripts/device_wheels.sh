#!/usr/bin/env bash
# Python 3.12 wheels of recforge's dependencies that the GPU machine's image lacks (pydantic, FastAPI, uvicorn,
# Optuna and what they need), downloaded into .whl/ (git-ignored) to be carried there, and RecTools for the
# side-by-side step into .whl-peers/ and implicit for the other one into .whl-implicit/ (git-ignored too); see
# docs/gpu.md.
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
# The peer of the GPU check's last step (RecTools' SASRec): its own code and what the image lacks, into .whl-peers/.
# RecTools 0.19 pins numpy < 2 on Python 3.12 only (it accepts numpy 2 on 3.13, with the same code), so it is
# installed without its pins over the image's numpy 2, Lightning and scipy; it needs pandas < 3 (tried here with
# numpy 2.4 and Lightning 2.6.6: `peers_rectools_seq.py --epochs 1,2` ran).
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  --platform manylinux2014_x86_64 -d .whl-peers rectools==0.19.0 pm-implicit==0.7.3 typeguard==4.6.1 \
  pandas==2.2.3 pytz==2025.2 tzdata==2025.2
ls .whl-peers
# implicit's ALS (the check's `implicit` part): its Linux wheel holds CUDA 13 kernels, which load when RMM is
# importable and CUDA 13's runtime, cuBLAS and cuRAND are (torch's CUDA 13 wheels bring those three). A folder of
# its own: RecTools' pm-implicit installs under the same name, `implicit`.
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
  --platform manylinux2014_x86_64 -d .whl-implicit implicit==0.7.3 threadpoolctl==3.6.0 rmm-cu13==26.10.0 \
  librmm-cu13==26.10.0 rapids-logger==0.3.0 cuda-bindings==13.0.3 cuda-pathfinder==1.9.1
ls .whl-implicit
