# launch/slurm_env.sh -- derive `accelerate launch`'s multi-node settings from SLURM's environment.
#
# Source it (don't run it) inside each node's task, e.g. from launch/slurm.sbatch:
#   source launch/slurm_env.sh && accelerate launch --config_file launch/multinode.yaml \
#       --machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_PROCESS_IP" \
#       --main_process_port "$MAIN_PROCESS_PORT" --num_machines "$NUM_MACHINES" \
#       --num_processes "$NUM_PROCESSES" recipes/digits.py
#
# Exports (a value already set in the environment wins, so any of them can be forced):
#   MAIN_PROCESS_IP    the first host of the allocation ($SLURM_JOB_NODELIST through
#                      `scontrol show hostnames`): node 0, where the rendezvous listens
#   MAIN_PROCESS_PORT  20000 + SLURM_JOB_ID % 20000: the same on every node of a job,
#                      different for two jobs sharing a node
#   MACHINE_RANK       $SLURM_NODEID: this node's index in the allocation (0 = main node)
#   NUM_MACHINES       $SLURM_JOB_NUM_NODES (or $SLURM_NNODES)
#   GPUS_PER_NODE      $SLURM_GPUS_ON_NODE (set by --gpus-per-node), else `nvidia-smi -L`'s count, else 1
#   NUM_PROCESSES      NUM_MACHINES x GPUS_PER_NODE (Accelerate counts processes over all nodes)
# Returns 1, with a message naming what is missing, outside a SLURM allocation. It changes
# no shell options of the caller (no set -e), so it is safe to source anywhere.

_slurm_env_fail() { echo "slurm_env.sh: $1" >&2; return 1; }

_slurm_env_main() {
    local nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
    [ -n "${SLURM_JOB_ID:-}" ] || { _slurm_env_fail "SLURM_JOB_ID is not set: run inside an sbatch/salloc allocation"; return 1; }

    if [ -z "${MAIN_PROCESS_IP:-}" ]; then
        [ -n "$nodelist" ] || { _slurm_env_fail "SLURM_JOB_NODELIST is not set"; return 1; }
        local hosts
        # Expand the compressed list (node[01-04]) into one hostname per line; keep the first.
        hosts="$(scontrol show hostnames "$nodelist")" || { _slurm_env_fail "scontrol show hostnames '$nodelist' failed"; return 1; }
        MAIN_PROCESS_IP="${hosts%%$'\n'*}"
        [ -n "$MAIN_PROCESS_IP" ] || { _slurm_env_fail "scontrol returned no hostname for '$nodelist'"; return 1; }
    fi
    MAIN_PROCESS_PORT="${MAIN_PROCESS_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    MACHINE_RANK="${MACHINE_RANK:-${SLURM_NODEID:-}}"
    [ -n "$MACHINE_RANK" ] || { _slurm_env_fail "SLURM_NODEID is not set: source this inside an srun task"; return 1; }
    NUM_MACHINES="${NUM_MACHINES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
    if [ -z "${GPUS_PER_NODE:-}" ]; then
        if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
            GPUS_PER_NODE="$SLURM_GPUS_ON_NODE"
        elif command -v nvidia-smi >/dev/null 2>&1; then
            GPUS_PER_NODE="$(nvidia-smi -L | wc -l)"
        fi
        [ "${GPUS_PER_NODE:-0}" -ge 1 ] 2>/dev/null || GPUS_PER_NODE=1
    fi
    NUM_PROCESSES="${NUM_PROCESSES:-$((NUM_MACHINES * GPUS_PER_NODE))}"
    export MAIN_PROCESS_IP MAIN_PROCESS_PORT MACHINE_RANK NUM_MACHINES GPUS_PER_NODE NUM_PROCESSES
}

_slurm_env_main
