# Sourced by train_read.sh and val_read.sh: the DeepSpeed launcher prefix from the environment, and running a
# command (printed first; DRY_RUN=1 only prints it).
#   HOSTFILE (several nodes) with LAUNCHER, NUM_NODES, MASTER_ADDR; otherwise GPUS for `deepspeed --include`.

deepspeed_launch_prefix() {
  LAUNCH=(deepspeed)
  if [[ -n "${HOSTFILE:-}" ]]; then
    LAUNCH+=(--hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}")
    [[ -n "${NUM_NODES:-}" ]] && LAUNCH+=(--num_nodes "$NUM_NODES")
    [[ -n "${MASTER_ADDR:-}" ]] && LAUNCH+=(--master_addr "$MASTER_ADDR")
  else
    LAUNCH+=(--include "$GPUS")
  fi
  LAUNCH+=(--master_port "$MASTER_PORT")
}

print_and_run() {
  printf '%q ' "$@"
  echo
  [[ "${DRY_RUN:-0}" == 1 ]] && exit 0
  exec "$@"
}
