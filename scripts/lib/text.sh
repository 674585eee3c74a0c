# shellcheck shell=bash
# Files: line counts and content digests, shared by the recipes and scripts/iterate.sh: source this file.
#
#   count_lines FILE     its lines, a last line without a final newline included (wc -l misses that one)
#   file_digests FILE... "NAME:SHA256 " of each file that exists, by content; the hashes are remembered in
#                        DIGEST_CACHE (default STAGE_DIR/digests) by size, modification time and path, so a large
#                        corpus is read once

count_lines() {
    awk 'END { print NR }' "$1"
}

file_digests() {
    local f key sum cache=${DIGEST_CACHE:-$STAGE_DIR/digests}
    mkdir -p "$(dirname "$cache")"
    for f in "$@"; do
        [[ -f $f ]] || continue
        key="$(stat -c '%s %.9Y' "$f") $(realpath "$f")"
        sum=$( [[ -f $cache ]] && awk -v k="$key" 'substr($0, length($1) + 2) == k { s = $1 } END { print s }' "$cache")
        if [[ -z $sum ]]; then
            sum=$(sha256sum < "$f" | cut -d' ' -f1)
            printf '%s %s\n' "$sum" "$key" >> "$cache"
        fi
        printf '%s:%s ' "$(basename "$f")" "$sum"
    done
}
