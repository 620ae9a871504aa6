#!/usr/bin/env bash
# READ training presets (the released recipes), launched with DeepSpeed.
#
#   ./train_read.sh <preset> [extra train_read.py flags ...]
#
# Presets:
#   read7b-from-sesame   READ-7B fine-tuned from SESAME-LLaVA-v1.5-7B (lora_r 8, lr 1e-4, mix 10:1:1:1:1:10)
#   read7b-from-scratch  READ-7B from LLaVA-1.5-7B + SAM ViT-H (lora_r 64, lr 1e-4, dice weight 4)
#   read13b-stage1       READ-13B stage 1 from LLaVA-1.5-13B + SAM (lora_r 64, lr 3e-4, mix 10:10:2:3:1:1, 10 points)
#   read13b-stage2       READ-13B stage 2 from the merged stage-1 model (lr 1e-4, mix 3:10:2:3:1:10, 30 points)
#   referseg             the original's ReferSeg mix from SESAME-7B (refer_seg:correct:vqa:neg = 12:2:2:1)
#
# Everything below can be overridden from the environment, e.g.
#   DATASET_DIR=/data/read GPUS=localhost:0,1,2,3 ./train_read.sh read7b-from-sesame --epochs 4
#   HOSTFILE=./hostfile MASTER_ADDR=10.0.0.1 ./train_read.sh read13b-stage1       # several nodes
#   DRY_RUN=1 ./train_read.sh read7b-from-scratch                                  # print the command only
# Extra flags are appended last, so they override the preset's values.
set -euo pipefail
cd "$(dirname "$0")"

# ---------------------------------------------------------------- paths
DATASET_DIR="${DATASET_DIR:-../dataset}"
VISION_TOWER="${VISION_TOWER:-$DATASET_DIR/clip-vit-large-patch14-336}"
SAM_CKPT="${SAM_CKPT:-$DATASET_DIR/sam_vit_h_4b8939.pth}"                  # only for the from-LLaVA presets
SESAME_7B="${SESAME_7B:-$DATASET_DIR/SESAME-LLaVA-v1.5-7B}"
LLAVA_7B="${LLAVA_7B:-$DATASET_DIR/llava-v1.5-7b}"
LLAVA_13B="${LLAVA_13B:-$DATASET_DIR/llava-v1.5-13b}"
READ_13B_STAGE1="${READ_13B_STAGE1:-./READ-LLaVA-v1.5-13B-stage1}"           # merged stage-1 output (merge_lora_weight.sh)
LOG_BASE_DIR="${LOG_BASE_DIR:-./runs}"

# ---------------------------------------------------------------- launcher (single node / several nodes)
GPUS="${GPUS:-localhost:0}"          # deepspeed --include for one node, e.g. localhost:0,1,2,3 (ignored with HOSTFILE)
HOSTFILE="${HOSTFILE:-}"             # DeepSpeed hostfile ("<host> slots=<gpus>" per line) for several nodes
NUM_NODES="${NUM_NODES:-}"           # use only the first N hosts of the hostfile
MASTER_ADDR="${MASTER_ADDR:-}"       # address of the first node (several nodes)
MASTER_PORT="${MASTER_PORT:-15997}"
LAUNCHER="${LAUNCHER:-pdsh}"         # pdsh | openmpi | mpich | impi | mvapich | slurm (several nodes)
DS_CONFIG="${DS_CONFIG:-}"           # optional JSON merged over the built-in config (scripts/ds_configs/*.json)
DRY_RUN="${DRY_RUN:-0}"

# ---------------------------------------------------------------- common settings (the original train_read.sh)
MODEL_MAX_LENGTH="${MODEL_MAX_LENGTH:-2048}"
BATCH_SIZE="${BATCH_SIZE:-2}"
GRAD_ACCUMULATION_STEPS="${GRAD_ACCUMULATION_STEPS:-10}"
NUM_CLASSES_PER_SAMPLE="${NUM_CLASSES_PER_SAMPLE:-3}"
EPOCHS="${EPOCHS:-8}"                    # the README's "about 8 epochs" ...
LR_SCHEDULE_EPOCHS="${LR_SCHEDULE_EPOCHS:-20}"  # ... on the original's 20-epoch LR schedule (its --epochs default)
REASONSEG_MIX="sem_seg||refer_seg||correct_refer_seg||vqa||neg_refer_seg||reason_seg"
REFERSEG_MIX="refer_seg||correct_refer_seg||vqa||neg_refer_seg"

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-1}"
}

[[ $# -ge 1 ]] || usage 1
PRESET="$1"
shift
case "$PRESET" in -h|--help|help) usage 0 ;; esac

need_sam() {
  if [[ ! -f "$SAM_CKPT" ]]; then
    echo "SAM checkpoint not found: $SAM_CKPT" >&2
    echo "Download https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth there, or set SAM_CKPT." >&2
    [[ "$DRY_RUN" == 1 ]] || exit 1
  fi
}

case "$PRESET" in
  read7b-from-sesame)
    ARGS=(--version "$SESAME_7B" --exp_name READ-LLaVA-v1.5-7B
          --dataset "$REASONSEG_MIX" --sample_rates 10,1,1,1,1,10
          --lora_r 8 --lr 0.0001 --sasp_preset read-7b) ;;
  read7b-from-scratch)
    need_sam
    ARGS=(--version "$LLAVA_7B" --no-use_released_param --vision_pretrained "$SAM_CKPT"
          --exp_name READ-LLaVA-v1.5-7B-scratch
          --dataset "$REASONSEG_MIX" --sample_rates 10,1,1,1,1,10
          --lora_r 64 --lr 0.0001 --dice_loss_weight 4 --sasp_preset read-7b) ;;
  read13b-stage1)
    need_sam
    ARGS=(--version "$LLAVA_13B" --no-use_released_param --vision_pretrained "$SAM_CKPT"
          --exp_name READ-LLaVA-v1.5-13B-stage1
          --dataset "$REASONSEG_MIX" --sample_rates 10,10,2,3,1,1
          --lora_r 64 --lr 0.0003 --sasp_preset read-13b-stage1) ;;
  read13b-stage2)
    ARGS=(--version "$READ_13B_STAGE1" --exp_name READ-LLaVA-v1.5-13B-stage2
          --dataset "$REASONSEG_MIX" --sample_rates 3,10,2,3,1,10
          --lora_r 64 --lr 0.0001 --sasp_preset read-13b-stage2) ;;
  referseg)
    ARGS=(--version "$SESAME_7B" --exp_name READ-LLaVA-v1.5-7B-referseg
          --dataset "$REFERSEG_MIX" --sample_rates 12,2,2,1 --lora_r 8) ;;
  *)
    echo "unknown preset '$PRESET'" >&2
    usage 1 ;;
esac

source scripts/launch_common.sh  # (the script has cd-ed to its own folder)
deepspeed_launch_prefix

CMD=("${LAUNCH[@]}" train_read.py
     --vision_tower "$VISION_TOWER" --dataset_dir "$DATASET_DIR" --log_base_dir "$LOG_BASE_DIR"
     --model_max_length "$MODEL_MAX_LENGTH" --batch_size "$BATCH_SIZE"
     --grad_accumulation_steps "$GRAD_ACCUMULATION_STEPS" --num_classes_per_sample "$NUM_CLASSES_PER_SAMPLE"
     --epochs "$EPOCHS" --lr_schedule_epochs "$LR_SCHEDULE_EPOCHS" --auto_resume
     "${ARGS[@]}")
[[ -n "$DS_CONFIG" ]] && CMD+=(--deepspeed_config "$DS_CONFIG")
CMD+=("$@")

print_and_run "${CMD[@]}"
