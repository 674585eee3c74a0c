#!/usr/bin/env bash
# Build the WMT corpus folder of one language pair from the official sources:
#
#   bash scripts/prepare-wmt.sh --pair en-de|en-fr|en-ro --out DIR [--checksums FILE]
#                                      [--orig DIR] [--extra-clean [--max-words 250] [--max-ratio 1.5]]
#
#   en-de  WMT'14: Europarl v7, Common Crawl, News Commentary v9; newstest2013 / newstest2014
#   en-fr  WMT'14: Europarl v7, Common Crawl, UN, News Commentary v9, Giga-FrEn; newstest2013 / 2014
#   en-ro  WMT'16: Europarl v8, SETIMES2; newsdev2016 / newstest2016
#
# Writes DIR/{train,valid,test}.{en,XX} (raw text; training pairs with an empty side dropped, with
# --extra-clean also those over 250 words or a word ratio of 1.5: fairseq filters only after BPE),
# DIR/checksums.observed (sha256 of every downloaded archive, the format --checksums reads) and
# DIR/README.md (provenance, line counts).
# Archives go to DIR/orig (--orig) through NAME.part and are not downloaded again once complete.
# A thin wrapper over `python -m fairseq_kd.wmt prepare` (see its docstring).
#
# Environment: DOWNLOAD [curl]   curl- or wget-compatible download command
#              SACREBLEU [sacrebleu]  sacrebleu command (valid/test sets, md5-verified by sacrebleu)
#              PYTHON [python]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}

case ${1:-} in
    ''|-h|--help) sed -n '2,20p' "$0"; [ $# -gt 0 ]; exit ;;
esac
command -v "$PYTHON" >/dev/null || { echo "prepare-wmt.sh: error: $PYTHON not found; set PYTHON" >&2; exit 1; }
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m fairseq_kd.wmt prepare "$@"
