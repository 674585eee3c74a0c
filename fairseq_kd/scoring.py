"""Turn ``fairseq-generate`` output into ordered text and score it with sacrebleu.

::

    python -m fairseq_kd.scoring extract gen.out hyp.txt --expect-lines 1000
    python -m fairseq_kd.scoring table --ref raw/test.de \\
        --system teacher=teacher.hyp --system student=student.hyp [--markdown results.md]

``extract`` takes the ``D-`` lines (detokenized, BPE removed when
``fairseq-generate`` was given ``--remove-bpe``), sorts them by sentence id,
and checks that every id from 0 to N-1 is present exactly once.  ``table``
prints corpus BLEU and chrF for each system with the sacrebleu signatures.
"""

import argparse
from typing import Dict, List, Optional, Sequence, Tuple

from fairseq_kd.errors import DistillationError
from fairseq_kd.textio import write_lines_atomic


def read_generate_output(path: str, prefix: str = "D") -> Dict[int, str]:
    """``{sentence id: text}`` from the ``{prefix}-<id>\\t<score>\\t<text>`` lines."""
    hyps: Dict[int, str] = {}
    tag = prefix + "-"
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith(tag):
                continue
            fields = line.rstrip("\n").split("\t")
            sid = int(fields[0][len(tag):])
            text = fields[2] if len(fields) > 2 else ""
            if sid in hyps:
                raise DistillationError(f"{path}: sentence {sid} has two hypotheses; decode with --nbest 1")
            hyps[sid] = text
    return hyps


def extract(generate_output: str, dest: str, expect_lines: Optional[int] = None) -> int:
    """Write the hypotheses of ``generate_output`` to ``dest`` in source order."""
    hyps = read_generate_output(generate_output)
    n = len(hyps) if expect_lines is None else expect_lines
    missing = [i for i in range(n) if i not in hyps]
    extra = [i for i in hyps if i >= n]
    if missing or extra:
        raise DistillationError(
            f"{generate_output}: expected hypotheses for sentences 0..{n - 1}, "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}; "
            f"re-run the decode"
        )
    return write_lines_atomic(dest, (hyps[i] for i in range(n)))


def read_text(path: str) -> List[str]:
    """The lines of a hypothesis or reference file (UTF-8, a byte-order mark dropped, one line per ``\\n``)."""
    from fairseq_kd.textio import read_text_lines

    return list(read_text_lines(path))


def score(hyp_file: str, ref_file: str) -> Tuple[float, float, str, str]:
    """``(bleu, chrf, bleu_signature, chrf_signature)`` of one system."""
    import sacrebleu

    hyps, refs = read_text(hyp_file), read_text(ref_file)
    if len(hyps) != len(refs):
        raise DistillationError(
            f"{hyp_file} has {len(hyps)} lines but the reference {ref_file} has {len(refs)}"
        )
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hyps, [refs])
    c = chrf.corpus_score(hyps, [refs])
    return b.score, c.score, str(bleu.get_signature()), str(chrf.get_signature())


def table(ref_file: str, systems: Sequence[Tuple[str, str]]) -> str:
    rows, signatures = [], set()
    for name, hyp in systems:
        bleu, chrf, bleu_sig, chrf_sig = score(hyp, ref_file)
        rows.append(f"| {name} | {bleu:.2f} | {chrf:.2f} |")
        signatures.update([bleu_sig, chrf_sig])
    lines = ["| system | BLEU | chrF |", "|---|---:|---:|", *rows, ""]
    lines += [f"sacrebleu: {sig}" for sig in sorted(signatures)]
    lines.append(f"reference: {ref_file}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="fairseq-generate output -> text -> sacrebleu table")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="ordered hypotheses from fairseq-generate output")
    ex.add_argument("generate_output")
    ex.add_argument("dest")
    ex.add_argument("--expect-lines", type=int, default=None, help="fail unless exactly this many sentences")
    tb = sub.add_parser("table", help="BLEU/chrF table of several systems")
    tb.add_argument("--ref", required=True, help="plain-text reference")
    tb.add_argument("--system", action="append", required=True, metavar="NAME=HYP", help="system name and hypothesis file")
    tb.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.command == "extract":
        n = extract(args.generate_output, args.dest, args.expect_lines)
        print(f"{args.dest}: {n} lines")
        return
    systems = []
    for item in args.system:
        if "=" not in item:
            raise DistillationError(f"--system {item!r}: expected NAME=HYPOTHESIS_FILE")
        name, path = item.split("=", 1)
        systems.append((name, path))
    text = table(args.ref, systems)
    print(text)
    if args.markdown:
        write_lines_atomic(args.markdown, text.split("\n"))


if __name__ == "__main__":
    main()
