# What every launcher in scripts/ does the same way (sourced through the recipes, not run): where the code is,
# the shape of a torchrun or SLURM job, the accumulation that keeps a recipe's total batch on fewer GPUs, and
# requeueing a SLURM job whose run stopped on a signal.
# torchrun launches read NNODES, NODE_RANK, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT; SLURM ones read SLURM_*.
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREEMPTED_EXIT=75  # preemption.PREEMPTED_EXIT_CODE: the run saved a checkpoint after a signal and can resume

# The processes a torchrun launch starts: NNODES x GPUS_PER_NODE.
torchrun_processes() {
  echo $(( ${NNODES:-1} * ${GPUS_PER_NODE:-8} ))
}

# ACCUM if set, else the gradient accumulation that gives a recipe written for RECIPE_GPUS GPUs its total batch
# on PROCESSES (RECIPE_GPUS / PROCESSES, at least 1).   usage: accum_for RECIPE_GPUS PROCESSES
accum_for() {
  echo "${ACCUM:-$(( $1 / $2 > 0 ? $1 / $2 : 1 ))}"
}

# torchrun on this node of an NNODES x GPUS_PER_NODE job.   usage: torchrun_launch DEFAULT_PORT PROGRAM ARGS...
torchrun_launch() {
  local port=$1
  shift
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
  srun python -u "$@" || rc=$?
  if [[ $rc -eq $PREEMPTED_EXIT ]]; then
    echo "stopped by a signal after saving a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$rc"
}
