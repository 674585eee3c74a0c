"""``python -m fairseq_kd.wmt prepare|average`` (console script ``fairseq-kd-prepare-wmt``).

``prepare`` builds a corpus folder (:func:`fairseq_kd.wmt.build.prepare`),
``average`` averages checkpoints (:func:`fairseq_kd.checkpoints.run_average`).
"""

import argparse
import os
from typing import List, Optional

from fairseq_kd.checkpoints import add_average_arguments, run_average
from fairseq_kd.errors import exit_on_error
from fairseq_kd.wmt.archives import PAIRS
from fairseq_kd.wmt.build import prepare
from fairseq_kd.wmt.log import PROG

DESCRIPTION = "The WMT corpora of the distillation papers, built from their official sources."


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fairseq_kd.wmt", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", prog=PROG, help="download and build a WMT corpus folder")
    pp.add_argument("--pair", required=True, choices=sorted(PAIRS))
    pp.add_argument("--out", required=True, help="corpus folder to write ({train,valid,test}.{src,tgt})")
    pp.add_argument("--orig", default=None, help="where archives are downloaded and extracted (default OUT/orig)")
    pp.add_argument("--checksums", default=None, metavar="FILE",
                    help="sha256 manifest ('HEX  ARCHIVE' lines, e.g. a checksums.observed); every archive must match")
    pp.add_argument("--extra-clean", action="store_true",
                    help="also drop raw training pairs over --max-words words or --max-ratio (fairseq filters only "
                         "after BPE, in prepare_bpe; without this only pairs with an empty side are dropped)")
    pp.add_argument("--max-words", type=int, default=None, help="with --extra-clean (implied): words per side [250]")
    pp.add_argument("--max-ratio", type=float, default=None, help="with --extra-clean (implied): word-count ratio [1.5]")
    av = sub.add_parser("average", help="average the last N interval checkpoints of a run")
    add_average_arguments(av)
    args = parser.parse_args(argv)
    if args.command == "average":
        run_average(args)
        return
    extra = args.extra_clean or args.max_words is not None or args.max_ratio is not None
    max_words = (250 if args.max_words is None else args.max_words) if extra else 0
    max_ratio = (1.5 if args.max_ratio is None else args.max_ratio) if extra else 0
    with exit_on_error(PROG):
        prepare(
            args.pair, args.out, args.orig, args.checksums,
            download=os.environ.get("DOWNLOAD") or "curl",
            sacrebleu=os.environ.get("SACREBLEU") or "sacrebleu",
            max_words=max_words, max_ratio=max_ratio,
        )
