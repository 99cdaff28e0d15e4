#!/usr/bin/env bash
# One autodecomp study on one node: N worker processes, one per GPU (CPU workers if the node
# has no GPU), sharing a journal file in the study folder (no database server needed).
#
#   studies/cluster/launch_local.sh studies/digits/study.yaml          # one worker per GPU
#   studies/cluster/launch_local.sh studies/digits/study.yaml 4        # 4 workers
#   studies/cluster/launch_local.sh studies/digits/study.yaml 4 postgresql+psycopg2://...
#
# Creates the study (and trains its baseline) if needed, starts the workers (logs in
# <study folder>/worker-K.log), waits for them, then writes the report. Ctrl-C stops them
# all; their running trials are re-queued for the next launch.
set -euo pipefail

yaml=${1:?usage: launch_local.sh studies/<name>/study.yaml [workers] [storage URL]}
folder=$(cd "$(dirname "$yaml")" && pwd)
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
workers=${2:-$(( gpus > 0 ? gpus : 2 ))}
storage=${3:-journal:///$folder/study.journal}
name=$(python -c "import sys; from autodecomp.config import load_config; print(load_config(sys.argv[1]).name)" "$yaml")

autodecomp create "$yaml" --storage "$storage"

pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < workers; i++)); do
  device=cpu
  if (( gpus > 0 )); then device=cuda:$(( i % gpus )); fi
  autodecomp worker --study "$name" --storage "$storage" --index "$i" --device "$device" \
    > "$folder/worker-$i.log" 2>&1 &
  pids+=("$!")
  echo "worker $i on $device: pid ${pids[-1]}, log $folder/worker-$i.log"
done

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
autodecomp report "$yaml" --storage "$storage"
exit "$status"
