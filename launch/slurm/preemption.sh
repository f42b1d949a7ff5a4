# Pre-emption and time limits for harness jobs on SLURM; sourced by the *.sbatch scripts.
#
# SLURM signals the batch shell (#SBATCH --signal=B:USR1@600) ten minutes before
# the time limit, or when the job is pre-empted. The trap below passes SIGUSR1 to
# every training rank on every node (never to torchrun, accelerate or deepspeed's
# launcher, which would die of it): each rank finishes its step, all write one
# checkpoint together and exit 0. The job then requeues itself (#SBATCH --requeue)
# and, since the run name does not depend on the job id, the next start continues
# from that checkpoint (train.resume=auto).
#
#   harness_run srun ... torchrun ... -m harness.pretrain ...

HARNESS_PREEMPTED=0

harness_signal_ranks() {
  # one task per node, beside the running job step
  srun --overlap --ntasks-per-node=1 --kill-on-bad-exit=0 bash -c '
    for pid in $(pgrep -f "harness[.]pretrain"); do
      cmd=$(tr "\0" " " < /proc/$pid/cmdline 2>/dev/null) || continue
      case "$cmd" in *torchrun*|*accelerate*|*bin/deepspeed*|*srun*|*pgrep*) continue ;; esac
      kill -USR1 "$pid" 2>/dev/null || true
    done' || true
}

harness_on_usr1() {
  HARNESS_PREEMPTED=1
  echo "harness: SIGUSR1 from SLURM: every rank checkpoints and stops; the job requeues itself" >&2
  harness_signal_ranks
}

harness_run() {
  trap harness_on_usr1 USR1
  "$@" &
  local pid=$! status=0
  # `wait` returns early (status > 128) whenever the trap runs: wait again until the step ends
  while true; do
    wait "$pid" && status=0 || status=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - USR1
  if [ "$HARNESS_PREEMPTED" = 1 ] && [ "$status" = 0 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$status"
}
