# shellcheck shell=bash
# One sharded job (teacher decoding, the teacher cache build) spread over this machine's GPUs, a
# SLURM array, or parallel CPU processes.  Source this file, then
#
#   launch_shards NUM_SHARDS "SHARD_IDS" CMD [ARGS...]
#
# runs `CMD ARGS... --num-shards NUM_SHARDS --shard-id I` for every I of SHARD_IDS and returns when
# they have all ended (a failed shard fails the call), according to
#
#   SHARD_LAUNCH [local]   local: on this machine; slurm: one task of an `sbatch --array` per shard,
#                          submitted with --wait (SBATCH_ARGS [] adds e.g. a partition and a time limit)
#   SHARD_GPUS []          local: the GPU ids of this machine ("0 1 2 3"); shard k of this machine runs
#                          with CUDA_VISIBLE_DEVICES set to one of them, one shard per GPU at a time.
#                          Empty: CPU processes, SHARD_PARALLEL [1] at a time
#   DRY_RUN [0]            1: print the commands, run nothing
#
#   wait_for_shards PATTERN NUM_SHARDS [TIMEOUT]   wait until every shard file printf(PATTERN, i, N)
#                          exists (shards decoded by other nodes), at most TIMEOUT seconds [0: no wait]

_shard_print() { printf '    %s\n' "$*"; }

launch_shards() {
    local n=$1 ids=$2 i slot=0 gpu
    shift 2
    local -a gpus running=()
    read -r -a gpus <<< "${SHARD_GPUS:-}"
    if [[ ${SHARD_LAUNCH:-local} == slurm ]]; then
        local cmd array
        cmd="$(printf '%q ' "$@")--num-shards $n --shard-id \$SLURM_ARRAY_TASK_ID"
        array=$(echo "$ids" | tr -s ' \n' ',' | sed 's/^,//; s/,$//')
        local -a sbatch=(sbatch --wait "--array=$array" --ntasks 1 --gpus-per-task 1)
        read -r -a extra <<< "${SBATCH_ARGS:-}"
        sbatch+=("${extra[@]}" --wrap "$cmd")
        if [[ ${DRY_RUN:-0} == 1 ]]; then _shard_print "$(printf '%q ' "${sbatch[@]}")"; return 0; fi
        "${sbatch[@]}"
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
