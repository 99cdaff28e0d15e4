#!/usr/bin/env bash
# The GPU check, to run whenever a GPU is lent (after `pip install -e .`), from anywhere:
#
#     bash bench/gpu_check.sh                  # PYTHON=... to pick the interpreter
#
# 1. device placement (tests/test_device.py, its cuda cases included), 2. solvers on the
# GPU against the CPU (bench/gpu_solvers.py: CP / PDP / Tucker / TT on ResNet kernels),
# 3. a short digits study on cuda (ladder, trials, all on the GPU), 4. decomposed-layer
# latency on the GPU (bench/latency.py --quick). Tables go to stdout and, when $OUT is
# set, to $OUT/gpu_check.txt. Installs nothing; exits 2 at once without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it where a GPU is" >&2
    exit 2
fi
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu_check.txt") 2>&1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { printf '\n## %s  (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "0. machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

step "1. device placement"
"$PY" -m pytest -q -p no:cacheprovider tests/test_device.py

step "2. solvers on GPU vs CPU"
"$PY" bench/gpu_solvers.py --device cuda

step "3. short study on cuda (digits, ladder of 3 plans, 6 trials)"
mkdir -p "$work/digits"
cp studies/digits/study.yaml "$work/digits/study.yaml"
"$PY" -m autodecomp search "$work/digits/study.yaml" --storage "sqlite:///$work/digits/s.db" \
    --set device=cuda --set threads=null --set trials=6 --set proxy.steps=40 \
    --set initial_design.plans=3 \
    --set "space=$PWD/search_spaces/digits_default.yaml" --set name=gpu-check
"$PY" - "$work/digits/s.db" <<'EOF'
import sys

import optuna

study = optuna.load_study(study_name="gpu-check", storage=f"sqlite:///{sys.argv[1]}")
env = study.user_attrs.get("environment", {})
states = [t.state.name for t in study.trials]
print("environment:", {k: v for k, v in env.items() if k != "seeds"})
print("trial states:", {s: states.count(s) for s in sorted(set(states))})
for t in study.trials[:6]:
    print(t.number, t.state.name, t.values, t.user_attrs.get("seconds"))
if not {"COMPLETE", "PRUNED"} & set(states):
    sys.exit("gpu_check: no trial ran to its end on cuda")
if env.get("device") != "cuda":
    sys.exit(f"gpu_check: the study ran on {env.get('device')!r}, not cuda")
EOF

step "4. decomposed-layer latency on GPU"
"$PY" bench/latency.py --device cuda --quick

step "done"
