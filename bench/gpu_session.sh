#!/usr/bin/env bash
# Everything one lent GPU session measures, in one command from the repository root on a
# bare GPU machine (issue 12's targets; with PARITY=1 then issue 11's short-schedule parity
# runs, whose curves results/gpu/acdc_parity/ already has):
#
#   bash bench/gpu_session.sh OUT_DIR [BUDGET_S]
#   PARITY=1 bash bench/gpu_session.sh OUT_DIR [BUDGET_S]
#   STAGES=profile,mps MPS_PHASES=compiled,g2 bash bench/gpu_session.sh OUT_DIR [BUDGET_S]
#   STAGES=bench,profile BENCH_PHASES=compiled,glue bash bench/gpu_session.sh OUT_DIR [BUDGET_S]
#   STAGES=baseline,bench,profile BENCH_PHASES=compiled BENCH_TAG=after bash bench/gpu_session.sh OUT_DIR [BUDGET_S]
#
# It needs, carried beside the checkout (all git-ignored; see BENCHMARKS.md "GPU session" and the header below):
#   .gpu_data/acdc.u8.xz + unpack_acdc.py   ../shared/tools/pack_acdc.py's ACDC (8-bit images)
#   .gpu_data/la.u8.xz                      bench/pack_la.py's small LA subset (8-bit, cropped; speed only)
#   .whl/                                   pydantic and its pure-Python needs
#   .baseline/ (stage baseline only)        an earlier commit's buarl/ and its COMMIT
# Writes to OUT_DIR: gpu_<card>[_$BENCH_TAG].json (bench/gpu.py), bench.log, session.log, with the
# baseline stage gpu_<card>_baseline.json + bench_baseline.log, where the card has
# MPS and time is left gpu_<card>_mps.json + bench_mps.log, and with PARITY=1
# parity_runs.tgz (the four `buarl train` folders, checkpoints left out). Stages get deadlines inside
# BUDGET_S (default 570 s) so the files are written even when a stage runs long.
# SMOKE=1 runs the same path on this CPU in a few minutes (tiny schedules; checks the script).
set -u
OUT=${1:?usage: bench/gpu_session.sh OUT_DIR [BUDGET_S]}
BUDGET=${2:-570}
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
mkdir -p "$OUT"
touch /tmp/gpu_session_started
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1

SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
    DEV="--device cpu"; SCHEDULE="pretrain_iters=4 iters=6 eval_every=5 device=cpu test_cases=2 val_cases=2"; ITERS=4
else
    DEV=""; SCHEDULE="pretrain_iters=700 iters=2100 eval_every=250"; ITERS=150
fi
# (the smoke runs in this checkout's venv, which has them)
[ "$SMOKE" = 1 ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || [ "$SMOKE" = 1 ]
python3 -c "import torch, pydantic, buarl.train; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())" \
    || exit 1
python3 .gpu_data/unpack_acdc.py .gpu_data/acdc.u8.xz /tmp/ACDC & a=$!
python3 bench/pack_la.py unpack .gpu_data/la.u8.xz /tmp/LA & b=$!
wait $a $b  # (a bare wait would also wait for the tee above)
echo "[$(( $(date +%s) - START )) s] data unpacked"
# the device clean-up of the pseudo-labels on this card equals scipy's, eager and compiled
# (tests/test_fast_paths.py on the CPU), and what one ACDC pseudo-label batch's clean-up costs
python3 - <<'PY'
import time, numpy as np, torch
from buarl.engine import _graph
from buarl.fast.components import KeepLargest
from buarl.method.pseudo import largest_components
dev = "cuda" if torch.cuda.is_available() else "cpu"
rng = np.random.default_rng(0)
for shape in [(36, 256, 256), (2, 64, 64, 48)]:
    for conn in ("full", "face"):
        m = rng.random(shape) < 0.3
        # compiled: ACDC's shape and connectivity only (the timing below reuses that graph)
        for compiled in (False, True) if (len(shape), conn) == (3, "full") else (False,):
            keep = KeepLargest(2, conn, _graph if compiled else (lambda fn: fn))
            same = np.array_equal(keep(torch.from_numpy(m).long().to(dev)).bool().cpu().numpy(),
                                  largest_components(m, conn))
            print(f"device components == scipy on {dev}, {shape}, {conn}, compiled={compiled}: {same}")
# 12 unlabeled 256x256 images, 4 classes (acdc): blobs like a teacher's argmax
g = torch.Generator().manual_seed(0)
labels = torch.nn.functional.avg_pool2d(torch.randn(12, 4, 256, 256, generator=g), 15, 1, 7).argmax(1).to(dev)
reps = 20 if dev == "cuda" else 1  # (the CPU smoke only checks the path)
for compiled in (False, True):
    keep = KeepLargest(4, "full", _graph if compiled else (lambda fn: fn))
    for _ in range(3 if dev == "cuda" else 1):
        keep(labels)
    torch.cuda.synchronize() if dev == "cuda" else None
    t = time.perf_counter()
    for _ in range(reps):
        keep(labels)
    torch.cuda.synchronize() if dev == "cuda" else None
    print(f"clean-up of a 12 x 256 x 256 batch, compiled={compiled}: {(time.perf_counter() - t) / reps * 1000:.2f} ms")
PY

PARITY=${PARITY:-0}
STAGES=${STAGES:-bench,mps}  # any of baseline, bench, profile, mps (in that order)
has() { [[ ",$STAGES," == *",$1,"* ]]; }
# The same bench on an earlier commit's code, for a before/after on this very card:
#   git archive COMMIT buarl | tar -x -C .baseline && echo COMMIT > .baseline/COMMIT  (carry .baseline)
if has baseline && [ -d .baseline/buarl ]; then
    BENCH_BUARL=$PWD/.baseline timeout $(( $(left) > 400 ? 200 : $(left) / 2 )) python3 bench/gpu.py --acdc /tmp/ACDC --iters $ITERS $DEV \
        --phases compiled --compile ${BASELINE_COMPILE:-reduce-overhead} --tag baseline 2>&1 | tee "$OUT/bench_baseline.log"
    echo "[$(( $(date +%s) - START )) s] baseline bench done"
fi
# Issue 12: G1 (solo, then compiled with CUDA graphs), G2 (4 packed), G5 (evaluation), G3
# (LA on the 2-labeled subset). Without the parity runs it has all but the packing-up time.
if has bench; then
    BENCH_T=$(( $(left) - (PARITY == 1 ? 320 : 30) ))
    timeout $BENCH_T python3 bench/gpu.py --acdc /tmp/ACDC --la /tmp/LA --la-labeled 2 --iters $ITERS $DEV \
        --phases ${BENCH_PHASES:-compiled,glue,g2,g3} ${BENCH_TAG:+--tag $BENCH_TAG} \
        2>&1 | tee "$OUT/bench.log"
    echo "[$(( $(date +%s) - START )) s] bench done"
fi
# Where a compiled iteration's time goes (torch.profiler; bench/results/gpu_profile_*.txt)
if has profile && [ "$(left)" -gt 100 ]; then
    timeout $(( $(left) > 200 ? 150 : $(left) - 40 )) python3 bench/gpu_profile.py --acdc /tmp/ACDC \
        --compile ${PROFILE_COMPILE:-reduce-overhead} $DEV 2>&1 | tail -80
    echo "[$(( $(date +%s) - START )) s] profile done"
fi
# G2 once more under MPS (processes share the GPU at once instead of by time slices), as a
# cluster that packs trials would run it: eager G1 again as its baseline, then 4 packed.
if has mps && [ "$SMOKE" != 1 ] && [ "$PARITY" != 1 ] && [ "$(left)" -gt 130 ] && command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
    if nvidia-cuda-mps-control -d; then
        timeout $(( $(left) - 15 )) python3 bench/gpu.py --acdc /tmp/ACDC --iters $ITERS \
            --phases ${MPS_PHASES:-g2} --compile reduce-overhead --tag mps 2>&1 | tee "$OUT/bench_mps.log"
        echo quit | nvidia-cuda-mps-control
        echo "[$(( $(date +%s) - START )) s] MPS bench done"
    fi
fi
# this session's result files only (a lent machine hands back a limited number of files)
[ "$SMOKE" = 1 ] || find bench/results -maxdepth 1 -newer /tmp/gpu_session_started \( -name 'gpu_*.json' -o -name 'gpu_profile_*.txt' \) \
    -exec cp {} "$OUT/" \;
if [ "$PARITY" != 1 ]; then echo "[$(( $(date +%s) - START )) s] session done"; exit 0; fi

# Issue 11: BCP and BUARL at 3 labeled patients, the short schedule (700 + 2100, val every
# 250 on the 20 val volumes), earlier settings vs BCP's, four runs at once on the one GPU.
EARLIER="lr_schedule=poly ema_warmup=true teacher_mode=eval self_train_init=last lcc_connectivity=face split_forward=false dice_smooth=1e-5"
COMMON="labeled=3 seed=1337 threads=4 $SCHEDULE"
run() {  # name, settings
    python3 -c "import sys; from buarl.cli import main; sys.exit(main())" train --config acdc --data-root /tmp/ACDC \
        --set $COMMON $2 --out "/tmp/parity/$1" > "/tmp/parity/$1.out" 2>&1
    echo "$1 exit $?"
}
mkdir -p /tmp/parity
T=$(( $(left) - 25 ))
echo "parity runs: ${T} s left for them"
export -f run; export COMMON
timeout "$T" bash -c "run bcp_earlier 'base=bcp url=false crl=false $EARLIER' &
    run bcp 'base=bcp url=false crl=false' &
    run buarl_earlier 'base=bcp url=true crl=true $EARLIER' &
    run buarl 'base=bcp url=true crl=true' &
    wait"
for f in /tmp/parity/*.out; do echo "== $f"; grep -E "val_dice|warning|Error|error" "$f" | tail -15; done
tar czf "$OUT/parity_runs.tgz" --exclude='*.pt' -C /tmp parity
echo "[$(( $(date +%s) - START )) s] session done"
