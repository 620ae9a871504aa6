#!/usr/bin/env bash
# Merge the LoRA weights of a READ training run into a released-layout directory (config READForCausalLM,
# tokenizer, sharded safetensors, no CLIP tower) that test_read.py, demo.py and val_read.sh load.
# Every variable below can be overridden from the environment, e.g.
#   EXP_DIRECTORY=./runs/read_reasonseg LORA_R=64 LORA_ALPHA=16 ./merge_lora_weight.sh
set -euo pipefail

EXP_DIRECTORY="${EXP_DIRECTORY:-./runs/READ-LLaVA-v1.5-7B}"          # train_read.py's <log_base_dir>/<exp_name>
BASE_MODEL="${BASE_MODEL:-../dataset/SESAME-LLaVA-v1.5-7B}"            # the --version training started from
VISION_TOWER="${VISION_TOWER:-../dataset/clip-vit-large-patch14-336}"
SAM_CHECKPOINT="${SAM_CHECKPOINT:-}"                                   # only for a plain LLaVA-1.5 base
HF_CKPT_PATH="${HF_CKPT_PATH:-${EXP_DIRECTORY}/READ-LLaVA-v1.5-7B}"   # output directory
# LoRA and SasP settings: empty = take them from the run's run_args.json (written by train_read.py beside
# ckpt_model), else the original defaults (r 8, alpha 16, q_proj,v_proj, SasP read-7b).
LORA_R="${LORA_R:-}"
LORA_ALPHA="${LORA_ALPHA:-}"
LORA_TARGET_MODULES="${LORA_TARGET_MODULES:-}"
PRECISION="${PRECISION:-bf16}"
MODEL_MAX_LENGTH="${MODEL_MAX_LENGTH:-2048}"
SASP_PRESET="${SASP_PRESET:-}"
TAG="${TAG:-}"      # empty: ckpt_model/latest (the best epoch); TAG=$(cat .../ckpt_model/last) for the newest

CKPT_DIR="${EXP_DIRECTORY}/ckpt_model"
if [[ ! -f "${CKPT_DIR}/latest" && -z "${TAG}" ]]; then
    echo "Error: ${CKPT_DIR} is not a DeepSpeed checkpoint directory (no 'latest' file); set EXP_DIRECTORY or TAG." >&2
    exit 1
fi

HERE="$(cd "$(dirname "$0")" && pwd)"
EXTRA=()
[[ -n "${TAG}" ]] && EXTRA+=(--tag "${TAG}")
[[ -n "${SAM_CHECKPOINT}" ]] && EXTRA+=(--sam_checkpoint "${SAM_CHECKPOINT}")
[[ -n "${LORA_R}" ]] && EXTRA+=(--lora_r "${LORA_R}")
[[ -n "${LORA_ALPHA}" ]] && EXTRA+=(--lora_alpha "${LORA_ALPHA}")
[[ -n "${LORA_TARGET_MODULES}" ]] && EXTRA+=(--lora_target_modules "${LORA_TARGET_MODULES}")
[[ -n "${SASP_PRESET}" ]] && EXTRA+=(--sasp_preset "${SASP_PRESET}")

python "${HERE}/scripts/merge_lora_weights.py" \
    --ckpt_dir "${CKPT_DIR}" \
    --version "${BASE_MODEL}" \
    --vision_tower "${VISION_TOWER}" \
    --save_path "${HF_CKPT_PATH}" \
    --precision "${PRECISION}" \
    --model_max_length "${MODEL_MAX_LENGTH}" \
    ${EXTRA[@]+"${EXTRA[@]}"} "$@"
