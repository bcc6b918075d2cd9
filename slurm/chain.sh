#!/bin/bash
# Submit the whole pipeline at once: prepare -> train -> eval -> convert. Each job starts only
# when the one before it finished successfully (--dependency=afterok); a failed step cancels the
# rest (--kill-on-invalid-dep=yes) instead of leaving them pending forever. A preempted training
# job requeues itself and the later steps simply wait for it.
#
# usage: slurm/chain.sh [options] [-- SBATCH_OPTION...]
#   --config FILE        training config                       (default configs/debug.yaml)
#   --run-dir DIR        run folder: checkpoints, model, export (default: train.output_dir)
#   --data-dir DIR       prepared data folder                  (default: data.path)
#   --skip-prepare       the data is prepared already: start with training
#   --prepare-opts STR   extra sbatch options for one step (word-split), e.g. "--time=8:00:00";
#   --train-opts STR       likewise --eval-opts, --convert-opts
#   -- ...               sbatch options for every step, e.g. -- --account=myproj
# Variables the scripts read (PYTHON, CORPUS, INPUT, TOKENIZER, PREPARE_ARGS, TRAIN_ARGS,
# EVAL_ARGS, CONVERT_ARGS, TOOLS, ...) pass through from this shell's environment.
# Prints "STEP JOBID" per submitted job.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG=configs/debug.yaml RUN_DIR="" DATA_DIR="" SKIP_PREPARE=0
declare -A opts=([prepare]="" [train]="" [eval]="" [convert]="")
common=()
die() { echo "chain.sh: $*" >&2; exit 2; }
while (($#)); do
    case $1 in
        --config) CONFIG=${2:?--config needs a file}; shift 2 ;;
        --run-dir) RUN_DIR=${2:?--run-dir needs a folder}; shift 2 ;;
        --data-dir) DATA_DIR=${2:?--data-dir needs a folder}; shift 2 ;;
        --skip-prepare) SKIP_PREPARE=1; shift ;;
        --prepare-opts | --train-opts | --eval-opts | --convert-opts)
            step=${1#--}; opts[${step%-opts}]=${2?"$1 needs a value"}; shift 2 ;;
        --) shift; common=("$@"); break ;;
        -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done
[[ -f $CONFIG ]] || die "config '$CONFIG' not found (run from the repository root?)"
# yaml_get SECTION KEY: a top-level section's scalar from the config, without needing Python here
yaml_get() {
    awk -v s="$1:" -v k="$2:" '$0 ~ "^" s {d = 1; next} /^[^ #]/ {d = 0} d && $1 == k {print $2; exit}' \
        "$CONFIG" | tr -d "\"'"
}
RUN_DIR=${RUN_DIR:-$(yaml_get train output_dir)}
DATA_DIR=${DATA_DIR:-$(yaml_get data path)}
[[ -n $RUN_DIR ]] || die "no train.output_dir in $CONFIG: pass --run-dir"
[[ -n $DATA_DIR ]] || die "no data.path in $CONFIG: pass --data-dir"
TOOLS=${TOOLS:-$(cd "$here/../tools" && pwd)}  # the programs eval and convert call
export CONFIG RUN_DIR DATA_DIR TOOLS
mkdir -p logs "$RUN_DIR"

submit() { # submit STEP DEPENDENCY: prints the job id
    local step=$1 dep=$2 extra=()
    read -r -a extra <<<"${opts[$step]}"
    local argv=(--parsable --kill-on-invalid-dep=yes)
    if [[ -n $dep ]]; then argv+=(--dependency="afterok:$dep"); fi
    sbatch "${argv[@]}" "${common[@]}" "${extra[@]}" "$here/$step.sbatch" | cut -d';' -f1
}

prev=""
steps=(train eval convert)
if ((!SKIP_PREPARE)); then steps=(prepare "${steps[@]}"); fi
for step in "${steps[@]}"; do
    prev=$(submit "$step" "$prev")
    echo "$step $prev"
done
