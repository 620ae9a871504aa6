#!/usr/bin/env bash
# READ evaluation presets (teacher-forced gIoU / cIoU, train_read.py --eval_only), launched with DeepSpeed.
#
#   ./val_read.sh <preset> [split] [extra train_read.py flags ...]
#
# Presets (released checkpoints; set the paths below or in the environment):
#   reasonseg-val       READ-7B (ReasonSeg val checkpoint) on ReasonSeg val, short/long subsets reported too
#   reasonseg-test      READ-7B (ReasonSeg test checkpoint) on ReasonSeg test
#   reasonseg-test-13b  READ-13B on ReasonSeg test with its SasP settings (60 points, 0.6/0.2, down-sample 1)
#   refcoco | refcoco+ | refcocog
#                       READ-7B (FP-RefCOCO checkpoint) on a refer split: val (default), test, testA, testB
#
# Examples:
#   ./val_read.sh reasonseg-val
#   ./val_read.sh refcoco testA
#   GPUS=localhost:0,1 ./val_read.sh refcocog test
#   ./val_read.sh reasonseg-val --resume runs/READ-LLaVA-v1.5-7B/ckpt_model --version ../dataset/SESAME-LLaVA-v1.5-7B
#                       (a training run's DeepSpeed checkpoint on top of the base it started from)
#   DRY_RUN=1 ./val_read.sh reasonseg-test-13b     # print the command only
set -euo pipefail
cd "$(dirname "$0")"

# ---------------------------------------------------------------- paths
DATASET_DIR="${DATASET_DIR:-../dataset}"
VISION_TOWER="${VISION_TOWER:-$DATASET_DIR/clip-vit-large-patch14-336}"
READ_7B_VAL="${READ_7B_VAL:-./READ-LLaVA-v1.5-7B-for-ReasonSeg-valset}"
READ_7B_TEST="${READ_7B_TEST:-./READ-LLaVA-v1.5-7B-for-ReasonSeg-testset}"
READ_13B_TEST="${READ_13B_TEST:-./READ-LLaVA-v1.5-13B-for-ReasonSeg-testset}"
READ_7B_REFER="${READ_7B_REFER:-./READ-LLaVA-v1.5-7B-for-fprefcoco}"
LOG_BASE_DIR="${LOG_BASE_DIR:-./runs}"

# ---------------------------------------------------------------- launcher
GPUS="${GPUS:-localhost:0}"          # deepspeed --include (ignored with HOSTFILE)
HOSTFILE="${HOSTFILE:-}"             # DeepSpeed hostfile for several nodes
NUM_NODES="${NUM_NODES:-}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-24996}"
LAUNCHER="${LAUNCHER:-pdsh}"
PRECISION="${PRECISION:-bf16}"
MODEL_MAX_LENGTH="${MODEL_MAX_LENGTH:-2048}"
DRY_RUN="${DRY_RUN:-0}"

usage() {
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-1}"
}

[[ $# -ge 1 ]] || usage 1
PRESET="$1"
shift
case "$PRESET" in -h|--help|help) usage 0 ;; esac
SPLIT=""
if [[ $# -ge 1 && "$1" != -* ]]; then
  SPLIT="$1"
  shift
fi

case "$PRESET" in
  reasonseg-val)
    SPLIT="${SPLIT:-val}"
    ARGS=(--version "$READ_7B_VAL" --val_dataset ReasonSeg --val_split "$SPLIT" --val_subsets --sasp_preset read-7b) ;;
  reasonseg-test)
    SPLIT="${SPLIT:-test}"
    ARGS=(--version "$READ_7B_TEST" --val_dataset ReasonSeg --val_split "$SPLIT" --val_subsets --sasp_preset read-7b) ;;
  reasonseg-test-13b)
    SPLIT="${SPLIT:-test}"
    ARGS=(--version "$READ_13B_TEST" --val_dataset ReasonSeg --val_split "$SPLIT" --val_subsets --sasp_preset read-13b) ;;
  refcoco|refcoco+|refcocog)
    SPLIT="${SPLIT:-val}"
    case "$SPLIT" in val|test|testA|testB) ;; *) echo "split must be val, test, testA or testB" >&2; exit 1 ;; esac
    ARGS=(--version "$READ_7B_REFER" --val_dataset "$PRESET" --val_split "$SPLIT" --sasp_preset read-7b) ;;
  *)
    echo "unknown preset '$PRESET'" >&2
    usage 1 ;;
esac

source scripts/launch_common.sh  # (the script has cd-ed to its own folder)
deepspeed_launch_prefix

CMD=("${LAUNCH[@]}" train_read.py --eval_only
     --vision_tower "$VISION_TOWER" --dataset_dir "$DATASET_DIR" --log_base_dir "$LOG_BASE_DIR"
     --exp_name "eval-${PRESET}-${SPLIT}" --precision "$PRECISION" --model_max_length "$MODEL_MAX_LENGTH"
     "${ARGS[@]}" "$@")

print_and_run "${CMD[@]}"
