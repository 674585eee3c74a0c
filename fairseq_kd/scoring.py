"""Turn ``fairseq-generate`` output into ordered text and score it with sacrebleu.

::

    python -m fairseq_kd.scoring extract gen.out hyp.txt --expect-lines 1000
    python -m fairseq_kd.scoring table --ref raw/test.de \\
        --system teacher=teacher.hyp --system student=student.hyp [--markdown results.md]

``extract`` takes the ``D-`` lines (detokenized, BPE removed when
``fairseq-generate`` was given ``--remove-bpe``), sorts them by sentence id,
and checks that every id from 0 to N-1 is present exactly once.  ``table``
prints corpus BLEU and chrF for each system with the sacrebleu signatures; ``--tokenized --lang L``
adds the papers' tokenized BLEU, ``--compound-split`` their compound-split BLEU (En-De), and
``--comet-model PATH --src SRC`` COMET (:mod:`fairseq_kd.scoring_tok`).  ``extract --detokenize L``
Moses-detokenizes Moses-tokenized output (the Moses + BPE data) for sacreBLEU.  ``compound-split GEN``
is fairseq's ``scripts/compound_split_bleu.sh GEN`` on a ``fairseq-generate`` output.
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


def extract(generate_output: str, dest: str, expect_lines: Optional[int] = None,
            detokenize: Optional[str] = None) -> int:
    """Write the hypotheses of ``generate_output`` to ``dest`` in source order (Moses-detokenized
    in language ``detokenize`` when given)."""
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
    ordered = [hyps[i] for i in range(n)]
    if detokenize:
        from fairseq_kd.scoring_tok import moses_detokenize

        ordered = moses_detokenize(ordered, detokenize)
    return write_lines_atomic(dest, ordered)


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


def table(ref_file: str, systems: Sequence[Tuple[str, str]], lang: Optional[str] = None,
          tokenized: bool = False, compound_split: bool = False, comet_model: Optional[str] = None,
          src_file: Optional[str] = None) -> str:
    from fairseq_kd import scoring_tok

    header, rule = ["system", "BLEU", "chrF"], ["---", "---:", "---:"]
    if tokenized:
        header.append("tok. BLEU")
    if compound_split:
        header.append("comp.-split BLEU")
    comet_note = None
    if comet_model and not scoring_tok.comet_available():
        comet_note = "COMET: skipped, unbabel-comet is not installed (pip install unbabel-comet)"
        comet_model = None
    if comet_model:
        header.append("COMET")
    rule += ["---:"] * (len(header) - 3)
    refs = read_text(ref_file)
    sources = read_text(src_file) if comet_model else None
    rows, signatures = [], set()
    for name, hyp in systems:
        bleu, chrf, bleu_sig, chrf_sig = score(hyp, ref_file)
        cells = [name, f"{bleu:.2f}", f"{chrf:.2f}"]
        hyps = read_text(hyp) if (tokenized or compound_split or comet_model) else None
        if tokenized or compound_split:
            tok, split = scoring_tok.paper_scores(hyps, refs, lang, compound_split)
            if tokenized:
                cells.append(f"{tok:.2f}")
            if compound_split:
                cells.append(f"{split:.2f}")
        if comet_model:
            cells.append(f"{scoring_tok.comet_score(comet_model, sources, hyps, refs):.2f}")
        rows.append("| " + " | ".join(cells) + " |")
        signatures.update([bleu_sig, chrf_sig])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|", *rows, ""]
    lines += [f"sacrebleu: {sig}" for sig in sorted(signatures)]
    if tokenized:
        lines.append(f"tok. BLEU: Moses-tokenized ({lang}) hypotheses and reference, sacreBLEU --tokenize none "
                     "(multi-bleu.perl), as the papers report")
    if compound_split:
        lines.append("comp.-split BLEU: fairseq's compound_split_bleu.sh (a-b -> a ##AT##-##AT## b, fairseq-score) on "
                     "hypotheses and reference tokenized as fairseq's test sets (tokenizer.perl -a)")
    if comet_model:
        lines.append(f"COMET: {comet_model} (x 100)")
    if comet_note:
        lines.append(comet_note)
    lines.append(f"reference: {ref_file}")
    return "\n".join(lines)


def scoring_tok_available() -> bool:
    from fairseq_kd.scoring_tok import comet_available

    return comet_available()


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="fairseq-generate output -> text -> sacrebleu table")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="ordered hypotheses from fairseq-generate output")
    ex.add_argument("generate_output")
    ex.add_argument("dest")
    ex.add_argument("--expect-lines", type=int, default=None, help="fail unless exactly this many sentences")
    ex.add_argument("--detokenize", metavar="LANG", default=None, help="Moses-detokenize the hypotheses (Moses + BPE data)")
    cs = sub.add_parser("compound-split", help="fairseq's compound_split_bleu.sh on a fairseq-generate output")
    cs.add_argument("generate_output")
    tb = sub.add_parser("table", help="BLEU/chrF table of several systems")
    tb.add_argument("--ref", required=True, help="plain-text reference")
    tb.add_argument("--system", action="append", required=True, metavar="NAME=HYP", help="system name and hypothesis file")
    tb.add_argument("--markdown", default=None, help="also write the table to this file")
    tb.add_argument("--lang", default=None, help="target language (Moses tokenization of the tokenized scores)")
    tb.add_argument("--tokenized", action="store_true", help="add tokenized BLEU (multi-bleu on Moses tokens)")
    tb.add_argument("--compound-split", action="store_true", help="add compound-split tokenized BLEU (En-De)")
    tb.add_argument("--comet-model", default=None, help="a local COMET model: add COMET (needs unbabel-comet, --src)")
    tb.add_argument("--src", default=None, help="source text of the test set (for COMET)")
    args = parser.parse_args(argv)
    if args.command == "extract":
        n = extract(args.generate_output, args.dest, args.expect_lines, args.detokenize)
        print(f"{args.dest}: {n} lines")
        return
    if args.command == "compound-split":
        from fairseq_kd.scoring_tok import compound_split_bleu

        print(compound_split_bleu(args.generate_output)[1])
        return
    systems = []
    for item in args.system:
        if "=" not in item:
            raise DistillationError(f"--system {item!r}: expected NAME=HYPOTHESIS_FILE")
        name, path = item.split("=", 1)
        systems.append((name, path))
    if (args.tokenized or args.compound_split) and not args.lang:
        raise DistillationError("--tokenized / --compound-split need --lang (the target language, e.g. de)")
    if args.comet_model and not args.src:
        raise DistillationError("--comet-model needs --src (the source side of the test set)")
    if args.comet_model and not scoring_tok_available():
        print("COMET skipped: unbabel-comet is not installed (pip install 'fairseq-kd[comet]')")
    text = table(args.ref, systems, args.lang, args.tokenized, args.compound_split, args.comet_model, args.src)
    print(text)
    if args.markdown:
        write_lines_atomic(args.markdown, text.split("\n"))


if __name__ == "__main__":
    main()
