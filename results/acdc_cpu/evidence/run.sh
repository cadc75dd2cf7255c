#!/usr/bin/env bash
# The evidence experiment (README.md beside this file), stage by stage. Every stage can be
# run again: a sweep whose folder exists continues with --resume, a finished one is replayed
# from its records. Ray storage and MLflow live in .experiments/acdc_evidence (git-ignored);
# the shared pre-trainings in its ray/pretrain/ serve every sweep of the experiment.
#   bash results/acdc_cpu/evidence/run.sh paired3    # BCP vs BUARL, 3 patients, seeds 11-18
#   bash results/acdc_cpu/evidence/run.sh search     # the Optuna search, seeds 2001-2002
#   bash results/acdc_cpu/evidence/run.sh tuned3     # the search's winner, 3 patients, seeds 11-18
#   bash results/acdc_cpu/evidence/run.sh paired7    # the three rows, 7 patients, seeds 11-14
#   bash results/acdc_cpu/evidence/run.sh tables     # results/acdc_cpu/evidence/ from MLflow and storage
set -euo pipefail
cd "$(dirname "$0")/../../.."
DATA=${DATA:-../shared/data/ACDC}
EXP=.experiments/acdc_evidence
mkdir -p "$EXP"
# Ray's bootstrap file and sockets apart from /tmp/ray: tests and other sweeps on this
# machine start their own local clusters there.
export RAY_TMPDIR=${RAY_TMPDIR:-/tmp/buarl-evidence} RAY_AUTH_MODE=disabled
# the cluster and every sweep joining it stay on loopback (docs/reliability.md, Security)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
PORT=${PORT:-6391}
PY=.venv/bin/python
COMMON=(--data-root "$DATA" --storage "$EXP/ray" --tracking-uri "sqlite:///$PWD/$EXP/mlflow.db")

sweep() {  # NAME SPACE ARGS...: one sweep, resumed if it has started before
  local name=$1 space=$2; shift 2
  local resume=(); [ -d "$EXP/ray/$name" ] && resume=(--resume)
  $PY orchestrator/sweep.py --space "$space" --name "$name" "${COMMON[@]}" "${resume[@]}" "$@" \
    >> "$EXP/$name.log" 2>&1
}

side_by_side() {  # SPACE NAME_A GLOB_A NAME_B GLOB_B: two sweeps of one space on one cluster
  # (a pure grid runs its points one after another: two sweeps run two trials at once)
  head_up
  sweep "$2" "$1" --address "127.0.0.1:$PORT" --threads 1 --only "$3" &
  sweep "$4" "$1" --address "127.0.0.1:$PORT" --threads 1 --only "$5" &
  wait
}

head_up() {  # one cluster on loopback for the sweeps of a stage that run side by side
  .venv/bin/ray status --address "127.0.0.1:$PORT" >/dev/null 2>&1 ||
    .venv/bin/ray start --head --port "$PORT" --node-ip-address 127.0.0.1 --num-cpus 2 \
      --include-dashboard false >> "$EXP/ray_head.log" 2>&1
}

case ${1:-} in
  paired3)
    side_by_side evidence.yaml evidence3_a 'labeled=3_seed=1[1-4]_*' evidence3_b 'labeled=3_seed=1[5-8]_*' ;;
  search)
    head_up
    sweep evidence_search evidence_search.yaml --address "127.0.0.1:$PORT" --threads 1 --max-concurrent 2 ;;
  tuned3)  # the search's winner (by validation) as a row on evidence.yaml's grid
    [ -f search_spaces/evidence_tuned.yaml ] || $PY -m orchestrator.promote --experiment evidence_search \
      --evaluation evidence --row "BUARL searched" --tracking-uri "sqlite:///$PWD/$EXP/mlflow.db" \
      --out search_spaces/evidence_tuned.yaml
    side_by_side evidence_tuned.yaml tuned3_a 'labeled=3_seed=1[1-4]_*' tuned3_b 'labeled=3_seed=1[5-8]_*' ;;
  paired7)
    side_by_side evidence.yaml evidence7_a 'labeled=7_seed=1[12]_*' evidence7_b 'labeled=7_seed=1[34]_*'
    if [ -f search_spaces/evidence_tuned.yaml ]; then
      sweep tuned7 evidence_tuned.yaml --address "127.0.0.1:$PORT" --threads 1 --only 'labeled=7_seed=1[1-4]_*'
    fi ;;
  tables)
    tuned=(); [ -f search_spaces/evidence_tuned.yaml ] && tuned=(--experiment evidence_tuned)
    for checkpoint in best last; do  # tables/ (best on validation, as BCP) and tables_last/
      $PY -m orchestrator.tables --experiment evidence "${tuned[@]}" --checkpoint $checkpoint \
        --tracking-uri "sqlite:///$PWD/$EXP/mlflow.db" \
        --out results/acdc_cpu/evidence/tables$([ $checkpoint = last ] && echo _last)
    done
    # the rows fork from one pre-training per seed even where their sweeps ran other code
    $PY -m orchestrator.pretrainings --storage "$EXP/ray" --out results/acdc_cpu/evidence/pretrainings.md
    if [ -d "$EXP/ray/evidence_search" ]; then
      $PY -m orchestrator.tables --experiment evidence_search --tracking-uri "sqlite:///$PWD/$EXP/mlflow.db" \
        --out results/acdc_cpu/evidence/search
    fi ;;
  *) sed -n 2,12p "$0"; exit 2 ;;
esac
