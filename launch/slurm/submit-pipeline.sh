#!/bin/bash
# Submits a data-pipeline stage as a Slurm job array over input files, plus a merge job that
# runs when every array task has succeeded (--dependency=afterok). Run it where sbatch works
# (a login node), from the repository root, with the Python environment active:
#
#   launch/slurm/submit-pipeline.sh STAGE WORK_DIR OUTPUT INPUT... [-- OVERRIDE...]
#
#   STAGE     a per-document stage: tokenize or clean (reddit and dedup split themselves
#             into tasks: python -m data_pipeline.reddit|dedup ... executor=slurm)
#   WORK_DIR  shared directory for inputs.txt (the file list), parts/ and logs/
#   OUTPUT    tokenize: the merged shard directory; clean: a directory of the parts' JSONL
#             files (any stage reads a directory as input)
#   INPUT     files, directories or globs (quote globs), expanded now the way every stage
#             expands input= (sorted), one file per line in WORK_DIR/inputs.txt
#   OVERRIDE  Hydra overrides for the stage, e.g. tokenizer.name=opt tokenizer.path=/models/opt
#
# Environment: FILES_PER_TASK (default 1) input files per array task; MAX_PARALLEL caps how
# many tasks run at once (--array=...%N); sbatch's own SBATCH_PARTITION, SBATCH_ACCOUNT,
# SBATCH_TIMELIMIT, ... apply to both jobs. Prints "<array job id> <merge job id>".
# Details: docs/slurm.md.
set -euo pipefail

if [ $# -lt 4 ]; then
    sed -n '2,21p' "$0" >&2
    exit 2
fi
stage=$1 work=$2 output=$3
shift 3
inputs=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do inputs+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the --
case $stage in
tokenize | clean) ;;
reddit | dedup)
    # One array task per input file is wrong for these: a thread's submission and comments
    # sit in different monthly files, near-duplicates in different files.
    echo "submit-pipeline: $stage splits itself into map/reduce tasks on Slurm; run" \
         "python -m data_pipeline.$stage input=... output=... executor=slurm tasks=N" >&2
    exit 2 ;;
*)
    echo "submit-pipeline: STAGE must be tokenize or clean" >&2
    exit 2 ;;
esac

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export PYTHON=${PYTHON:-$(command -v python || command -v python3)}
export OPT_TRAIN_ROOT=$ROOT
work=$(mkdir -p "$work" && cd "$work" && pwd)
case $output in /*) ;; *) output=$PWD/$output ;; esac
mkdir -p "$work/parts" "$work/logs"

(cd "$ROOT" && "$PYTHON" -c '
import sys
from data_pipeline.io import expand_inputs
for p in expand_inputs(sys.argv[1:]):
    print(p.resolve())
' "${inputs[@]}") >"$work/inputs.txt"
n=$(wc -l <"$work/inputs.txt")
per=${FILES_PER_TASK:-1}
tasks=$(( (n + per - 1) / per ))
throttle=${MAX_PARALLEL:+%$MAX_PARALLEL}

array=$(sbatch --parsable --job-name="opt-data-$stage" --array="0-$((tasks - 1))$throttle" \
    --output="$work/logs/%x-%A_%a.out" \
    "$ROOT/launch/slurm/pipeline.sbatch" task "$stage" "$work" "$@")
array=${array%%;*}
# --kill-on-invalid-dep: when a task fails the merge is cancelled, not left pending forever.
merge=$(sbatch --parsable --job-name="opt-data-merge" --dependency="afterok:$array" \
    --kill-on-invalid-dep=yes --output="$work/logs/%x-%j.out" \
    "$ROOT/launch/slurm/pipeline.sbatch" merge "$stage" "$work" "$output")
merge=${merge%%;*}
echo "submit-pipeline: $n input files, $tasks array tasks (job $array), merge job $merge" >&2
echo "$array $merge"
