# shellcheck shell=bash
# Sharded jobs (teacher decoding, the teacher cache build) spread over this machine's GPUs, the tasks of
# a SLURM allocation, or parallel CPU processes.  Source this file, then
#
#   launch_shards NUM_SHARDS "SHARD_IDS" CMD [ARGS...]
#
# runs `CMD ARGS... --num-shards NUM_SHARDS --shard-id I` for every I of SHARD_IDS and returns when
# they have all ended (a failed shard fails the call), and
#
#   launch_workers W CMD [ARGS...]
#
# runs W workers of a work queue, `CMD ARGS... --worker-id NAME.k` (k = 0..W-1; under slurm the task id,
# fairseq_kd.decoding's default), and returns when they have all ended; according to
#
#   SHARD_LAUNCH [local]   local: on this machine; slurm: one `srun` step inside the allocation (no nested
#                          sbatch: the allocation's GPUs decode), --kill-on-bad-exit; shard I runs on task
#                          I mod NTASKS.  SHARD_NODES [1] nodes, SHARD_TASKS [NUM_SHARDS] tasks,
#                          SHARD_CPUS [1] --cpus-per-task, SHARD_GPU_TASKS [0] (1: --gpus-per-task 1),
#                          SRUN_ARGS [] more srun flags, split as a shell would ('--comment "a b"')
#   SHARD_GPUS []          local: the GPU ids of this machine ("0 1 2 3"); shard k of this machine runs
#                          with CUDA_VISIBLE_DEVICES set to one of them, one shard per GPU at a time.
#                          Empty: CPU processes, SHARD_PARALLEL [1] at a time
#   WORKER_NAME [hostname] local: the workers' name prefix
#   DRY_RUN [0]            1: print the commands, run nothing
#
#   wait_for_shards PATTERN NUM_SHARDS [TIMEOUT]   wait until every shard file printf(PATTERN, i, N)
#                          exists (shards decoded by other nodes), at most TIMEOUT seconds [0: no wait]
#   split_quoted ARRAY TEXT  TEXT split into words as a shell would (quotes kept together); fails on an
#                          unmatched quote

split_quoted() {
    local -n _into=$1
    local words
    _into=()
    [[ -n ${2//[[:space:]]/} ]] || return 0
    words=$(printf '%s' "$2" | xargs printf '%q ' 2>/dev/null) || return 1  # an unmatched quote
    eval "_into=($words)"  # each word %q-quoted by printf
}

_srun_step() {  # the srun prefix of a shard / worker step of N tasks
    local -a extra
    split_quoted extra "${SRUN_ARGS:-}" || { echo "error: SRUN_ARGS: quote its values as in a shell, got: $SRUN_ARGS" >&2; return 1; }
    SRUN_STEP=(srun --nodes "${SHARD_NODES:-1}" --ntasks "$1" --cpus-per-task "${SHARD_CPUS:-1}" --kill-on-bad-exit=1)
    if [[ ${SHARD_GPU_TASKS:-0} == 1 ]]; then SRUN_STEP+=(--gpus-per-task 1); fi
    SRUN_STEP+=("${extra[@]}")
}

launch_workers() {
    local w=$1 k gpu
    shift
    local -a gpus pids=()
    read -r -a gpus <<< "${SHARD_GPUS:-}"
    if [[ ${SHARD_LAUNCH:-local} == slurm ]]; then
        _srun_step "$w" || return 1
        if [[ ${DRY_RUN:-0} == 1 ]]; then _shard_print "$(printf '%q ' "${SRUN_STEP[@]}" "$@")"; return 0; fi
        "${SRUN_STEP[@]}" "$@"
        return
    fi
    for ((k = 0; k < w; k++)); do
        gpu=
        if (( ${#gpus[@]} > 0 )); then gpu=${gpus[k % ${#gpus[@]}]}; fi
        if [[ ${DRY_RUN:-0} == 1 ]]; then
            _shard_print "${gpu:+CUDA_VISIBLE_DEVICES=$gpu }$(printf '%q ' "$@")--worker-id ${WORKER_NAME:-$(hostname)}.$k"
            continue
        fi
        if [[ -n $gpu ]]; then
            CUDA_VISIBLE_DEVICES=$gpu "$@" --worker-id "${WORKER_NAME:-$(hostname)}.$k" &
        else
            "$@" --worker-id "${WORKER_NAME:-$(hostname)}.$k" &
        fi
        pids+=($!)
    done
    for k in "${pids[@]}"; do
        wait "$k" || { echo "a decode worker failed: $*" >&2; return 1; }
    done
}

_shard_print() { printf '    %s\n' "$*"; }

launch_shards() {
    local n=$1 ids=$2 i slot=0 gpu
    shift 2
    local -a gpus running=()
    read -r -a gpus <<< "${SHARD_GPUS:-}"
    if [[ ${SHARD_LAUNCH:-local} == slurm ]]; then  # task t of the step decodes shards t, t + NTASKS, ...
        local tasks=${SHARD_TASKS:-$n} loop
        _srun_step "$tasks" || return 1
        loop="ids=($ids); for ((k = SLURM_PROCID; k < \${#ids[@]}; k += SLURM_NTASKS)); do $(printf '%q ' "$@")--num-shards $n --shard-id \${ids[k]} || exit 1; done"
        if [[ ${DRY_RUN:-0} == 1 ]]; then _shard_print "$(printf '%q ' "${SRUN_STEP[@]}" bash -c "$loop")"; return 0; fi
        "${SRUN_STEP[@]}" bash -c "$loop"
        return
    fi
    local parallel=${SHARD_PARALLEL:-1}
    if (( ${#gpus[@]} > 0 )); then parallel=${#gpus[@]}; fi
    for i in $ids; do
        gpu=
        if (( ${#gpus[@]} > 0 )); then gpu=${gpus[slot % ${#gpus[@]}]}; fi
        slot=$((slot + 1))
        if [[ ${DRY_RUN:-0} == 1 ]]; then
            _shard_print "${gpu:+CUDA_VISIBLE_DEVICES=$gpu }$(printf '%q ' "$@")--num-shards $n --shard-id $i"
            continue
        fi
        if [[ -n $gpu ]]; then
            CUDA_VISIBLE_DEVICES=$gpu "$@" --num-shards "$n" --shard-id "$i" &
        else
            "$@" --num-shards "$n" --shard-id "$i" &
        fi
        running+=($!)
        if (( ${#running[@]} >= parallel )); then
            wait "${running[0]}" || { echo "shard job failed: $* (shard of $n)" >&2; return 1; }
            running=("${running[@]:1}")
        fi
    done
    for i in "${running[@]}"; do
        wait "$i" || { echo "shard job failed: $* (shard of $n)" >&2; return 1; }
    done
}

wait_for_shards() {
    local pattern=$1 n=$2 timeout=${3:-0} start=$SECONDS i missing
    [[ ${DRY_RUN:-0} == 1 ]] && return 0
    while :; do
        missing=()
        for ((i = 0; i < n; i++)); do
            # shellcheck disable=SC2059
            [[ -f $(printf "$pattern" "$i" "$n") ]] || missing+=("$i")
        done
        (( ${#missing[@]} == 0 )) && return 0
        if (( SECONDS - start >= timeout )); then
            # shellcheck disable=SC2059
            echo "shards ${missing[*]} of $n are not complete ($(printf "$pattern" "${missing[0]}" "$n") missing)" >&2
            return 1
        fi
        sleep 20
    done
}
