#!/usr/bin/env bash
# Notebook 000 (DataLab Cup 4): interactive slate recommendation. Policies are fitted on the visible events, learn
# online for 1 training episode, then play 5 test episodes (each from the best training state) in slates of 5;
# per-user `user_id,avg_score` CSVs, the results table and the click-through curves go to the output folder.
# `hybrid` is the notebook's agent (top-2 of the factor model + content neighbours of a random clicked item,
# updated after every click); the others are references. The competition's news environment is not available,
# so the simulator is built from ml-latest-small (see docs/interactive.md).
# Run from the repository root:  bash examples/nb000_interactive.sh [OUT_FOLDER]
set -euo pipefail
recforge simulate -d ml-latest-small \
    --policies random,pop,greedy-static,hybrid,linucb \
    --train-episodes 1 --test-episodes 5 --seed 0 \
    -o "${1:-results/repro/nb000-interactive}"
