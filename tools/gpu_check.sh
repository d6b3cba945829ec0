#!/usr/bin/env bash
# The first GPU numbers in one command (issue 21; README "A first GPU check"):
#
#   bash tools/gpu_check.sh                # one GPU, at most 8 minutes: results/gpu/<stamp>/summary.md
#   bash tools/gpu_check.sh --dry-run      # the same steps on the CPU at tiny sizes (add --in-process: ~30 s)
#
# Options (tools/gpu_check.py --help): --out DIR, --budget-s SECONDS. PYTHON picks the interpreter
# (default python3, the one with torch on the GPU machine). No install is needed: the repository is
# put on PYTHONPATH, and nothing here imports fvcore, ptflops or av.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" tools/gpu_check.py "$@"
