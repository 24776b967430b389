# What every launcher in scripts/ does the same way (sourced through the recipes, not run): where the code is,
# the shape of a torchrun or SLURM job, the accumulation that keeps a recipe's total batch on fewer GPUs, and
# requeueing a SLURM job whose run stopped on a signal.
# torchrun launches read NNODES, NODE_RANK, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT; SLURM ones read SLURM_*.
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The launchers run from the repository, whose folders their defaults name (data/k400, output/...). A relative
# path the user gives is relative to where the launcher was started, as for any command: made absolute here,
# before any cd. URLs (FINETUNE=https://...) are left alone.
for _path_var in DATA_DIR DATA_ROOT OUTPUT_DIR FINETUNE CHECKPOINT FEATURES; do
  if [[ -n ${!_path_var:-} && ${!_path_var} != /* && ${!_path_var} != *://* ]]; then
    printf -v "$_path_var" '%s' "$PWD/${!_path_var}"
  fi
done
unset _path_var
PREEMPTED_EXIT=75  # preemption.PREEMPTED_EXIT_CODE: the run saved a checkpoint after a signal and can resume

# The processes a torchrun launch starts: NNODES x GPUS_PER_NODE.
torchrun_processes() {
  echo $(( ${NNODES:-1} * ${GPUS_PER_NODE:-8} ))
}

# ACCUM if set, else the gradient accumulation that gives a recipe written for RECIPE_GPUS GPUs its total batch
# on PROCESSES: RECIPE_GPUS / PROCESSES. When PROCESSES does not divide RECIPE_GPUS no accumulation keeps the total
# batch (and the lr scaled from it): an error (exit 2) that says so, unless ACCUM is set.
# usage (an assignment, so that `set -e` stops the launcher): ACCUM_ITER=$(accum_for RECIPE_GPUS PROCESSES)
accum_for() {
  if [[ -n ${ACCUM:-} ]]; then
    echo "$ACCUM"
  elif (( $2 > 0 && $2 <= $1 && $1 % $2 == 0 )); then
    echo $(( $1 / $2 ))
  else
    echo "error: the recipe's total batch is for $1 GPUs and no gradient accumulation keeps it on $2 processes" \
      "($2 does not divide $1); set ACCUM=N (total batch = per-GPU batch x N x $2; the lr scales with it)" >&2
    exit 2
  fi
}

# torchrun on this node of an NNODES x GPUS_PER_NODE job.   usage: torchrun_launch DEFAULT_PORT PROGRAM ARGS...
torchrun_launch() {
  local port=$1
  shift
  if (( ${NNODES:-1} > 1 )) && [[ -z ${MASTER_ADDR:-} ]]; then
    # 127.0.0.1 would have every node wait for a rendezvous on itself until the timeout
    echo "error: NNODES=${NNODES} needs MASTER_ADDR (node 0's address), on every node" >&2
    exit 2
  fi
  cd "$REPO_DIR"
  torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-$port}" "$@"
}

# One task per GPU under SLURM (the programs read SLURM_* themselves), then exit with the run's status. SIGUSR1
# before the time limit (--signal=USR1@300) or a preemption's SIGTERM makes the run save a checkpoint and exit 75:
# the job is then requeued, and the requeued job resumes from that checkpoint (auto-resume).
# usage: srun_requeue_on_preemption PROGRAM ARGS...
srun_requeue_on_preemption() {
  cd "$REPO_DIR"
  export MASTER_PORT=${MASTER_PORT:-$(( 12000 + SLURM_JOB_ID % 20000 ))}
  local rc=0
  # SLURM sends a preemption's SIGTERM to this shell too: without a trap it would die (143) before srun's tasks
  # exit 75 after saving, and the job would not be requeued. With one, bash waits for srun, then runs the trap.
  trap 'echo "SIGTERM: waiting for the run to save a checkpoint"' TERM
  # srun no longer passes the job's --cpus-per-task on to its tasks (Slurm 22.05 to 23.02): the decoding workers
  # would share one core.
  srun ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} python -u "$@" || rc=$?
  if [[ $rc -eq $PREEMPTED_EXIT ]]; then
    echo "stopped by a signal after saving a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$rc"
}
