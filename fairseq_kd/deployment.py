"""The deployment table: models as they would ship, fairseq fp32 next to a CTranslate2 int8 export.

For every model given (the teacher) and the best of the candidates (the KD students, by the BLEU of
their test translations): its float32 weights as a fairseq checkpoint without optimizer state, and
its ``fairseq-kd-export`` int8 folder, each with sacreBLEU BLEU on the test set, bytes on disk and
translation speed on one thread (raw text in, raw text out, model loading excluded: sentences/s and
target subword tokens/s, EOS not counted).  Both formats translate the same batches in input order
with the same beam and length cap.  See docs/export.md.

::

    python -m fairseq_kd.deployment --data BIN --src-text test.en --ref test.de --model teacher=T.pt \\
        --candidate "student word_kd=S.pt=S.test.hyp" ... --beam 4 --out-dir WORK/deployment --markdown T.md
"""

import argparse
import json
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

from fairseq_kd.errors import DistillationError, exit_on_error

FORMATS = ("fairseq fp32", "CTranslate2 int8")


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    import sacrebleu

    if len(hyps) != len(refs):
        raise DistillationError(f"{len(hyps)} translations for {len(refs)} references; re-decode")
    return sacrebleu.metrics.BLEU().corpus_score(list(hyps), [list(refs)]).score


def best_candidate(candidates: Sequence[Tuple[str, str, str]], refs: Sequence[str]) -> Tuple[str, str, float]:
    """``(name, checkpoint, bleu)`` of the candidate ``(name, checkpoint, hyp_file)`` whose translations
    score the highest BLEU against ``refs`` (the first of equals)."""
    from fairseq_kd.scoring import read_text

    if not candidates:
        raise DistillationError("no --candidate given; pass the KD students as NAME=CHECKPOINT=HYP_FILE")
    best = None
    for name, checkpoint, hyp_file in candidates:
        if not os.path.isfile(hyp_file):
            raise DistillationError(f"{hyp_file} not found: translate the test set with {name} first")
        bleu = corpus_bleu(read_text(hyp_file), refs)
        if best is None or bleu > best[2]:
            best = (name, checkpoint, bleu)
    return best


def write_fp32_checkpoint(checkpoint: str, out: str) -> int:
    """``checkpoint`` without its optimizer state, parameters in float32 (what fairseq writes with
    ``--no-save-optimizer-state``), written through a temporary name; returns its bytes."""
    import torch

    from fairseq_kd.checkpoints import safe_torch_load

    state = safe_torch_load(checkpoint)
    if not isinstance(state, dict) or "model" not in state:
        raise DistillationError(f"{checkpoint} is not a fairseq checkpoint (no 'model' entry)")
    state = {k: v for k, v in state.items() if k != "last_optimizer_state"}
    state["model"] = {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}
    tmp = f"{out}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, out)
    return os.path.getsize(out)


def batches(n: int, batch_size: int) -> List[range]:
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


class FairseqTranslator:
    """A checkpoint decoded by fairseq's ``SequenceGenerator`` on raw text (SentencePiece segmentation),
    with the length cap of ``fairseq_kd.export.max_length``."""

    def __init__(self, checkpoint: str, data: str, spm_model: str, beam: int, lenpen: float,
                 max_len_a: float, max_len_b: int):
        import sentencepiece as spm

        from fairseq_kd.decoding.fairseq_backend import FairseqBackend, build_task
        from fairseq_kd.checkpoints import load_checkpoint_state

        cfg = load_checkpoint_state(checkpoint)["cfg"]
        self.task = build_task(data, cfg.task.get("source_lang"), cfg.task.get("target_lang"))
        settings = dict(beam=beam, nbest=1, max_len_a=max_len_a, max_len_b=max_len_b, min_len=1, lenpen=lenpen,
                        unkpen=0.0, teacher=[checkpoint])
        import torch

        self.backend = FairseqBackend(self.task, checkpoint, settings, torch.device("cpu"))
        self.sp = spm.SentencePieceProcessor(model_file=spm_model)

    def translate_tokens(self, sources: Sequence[Sequence[str]]) -> List[List[str]]:
        from fairseq.data import LanguagePairDataset

        src_dict = self.task.source_dictionary
        ids = [src_dict.encode_line(" ".join(s), add_if_not_exist=False, append_eos=True).long() for s in sources]
        dataset = LanguagePairDataset(ids, [len(t) for t in ids], src_dict, tgt_dict=self.task.target_dictionary,
                                      shuffle=False)
        sample = dataset.collater([dataset[i] for i in range(len(ids))])
        hyps = self.backend.translate(sample)
        order = sample["id"].tolist()  # the collater sorts by source length
        out: List[Optional[List[str]]] = [None] * len(ids)
        for index, hyp in zip(order, hyps):
            out[index] = hyp[0][0].split()
        return out

    def translate(self, lines: Sequence[str], batch_size: int) -> Tuple[List[str], int]:
        sources = [self.sp.encode(line, out_type=str) for line in lines]
        hyps: List[List[str]] = []
        for b in batches(len(sources), batch_size):
            hyps.extend(self.translate_tokens([sources[i] for i in b]))
        return [self.sp.decode_pieces(h) for h in hyps], sum(len(h) for h in hyps)


def ct2_translate(model_dir: str, lines: Sequence[str], batch_size: int, threads: int, beam: int, lenpen: float,
                  max_len_a: float, max_len_b: int, model=None) -> Tuple[List[str], int]:
    """The exported folder's translations of raw ``lines`` and the number of target subword tokens."""
    from fairseq_kd.export import Exported

    model = model or Exported(model_dir, threads=threads)
    sources = model.segmenter.encode(lines)
    hyps: List[List[str]] = []
    for b in batches(len(sources), batch_size):
        hyps.extend(model.translate_tokens([sources[i] for i in b], beam=beam, max_len_a=max_len_a,
                                           max_len_b=max_len_b, lenpen=lenpen))
    return model.segmenter.decode(hyps), sum(len(h) for h in hyps)


def measure(name: str, checkpoint: str, args, lines: Sequence[str], refs: Sequence[str]) -> List[Dict]:
    """The two rows (fairseq fp32, CTranslate2 int8) of one model; translations in OUT_DIR/NAME.*.hyp."""
    import torch

    from fairseq_kd.export import Exported, export, folder_bytes
    from fairseq_kd.textio import write_lines_atomic

    slug = name.replace(" ", "_")
    rows = []
    fp32 = os.path.join(args.out_dir, f"{slug}.fp32.pt")
    size = write_fp32_checkpoint(checkpoint, fp32)
    int8 = os.path.join(args.out_dir, f"{slug}.int8")
    record = export(checkpoint, args.data, int8, "int8", force=True)
    options = dict(beam=args.beam, lenpen=args.lenpen, max_len_a=args.max_len_a, max_len_b=args.max_len_b)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        translator = FairseqTranslator(fp32, args.data, os.path.join(int8, record["segmentation_file"]), **options)
        start = time.perf_counter()
        hyps, tokens = translator.translate(lines, args.batch_size)
        rows.append(dict(model=name, format=FORMATS[0], seconds=time.perf_counter() - start, hyps=hyps,
                         tokens=tokens, bytes=size))
    finally:
        torch.set_num_threads(threads)
    model = Exported(int8, threads=args.threads)
    start = time.perf_counter()
    hyps, tokens = ct2_translate(int8, lines, args.batch_size, args.threads, model=model, **options)
    rows.append(dict(model=name, format=FORMATS[1], seconds=time.perf_counter() - start, hyps=hyps, tokens=tokens,
                     bytes=folder_bytes(int8)))
    for row, suffix in zip(rows, ("fp32", "int8")):
        write_lines_atomic(os.path.join(args.out_dir, f"{slug}.{suffix}.hyp"), row["hyps"])
        row.update(bleu=corpus_bleu(row.pop("hyps"), refs), sentences=len(lines), parameters=record["parameters"])
    return rows


def finish_rows(rows: List[Dict]) -> List[Dict]:
    """Speeds (sentences/s, target tokens/s) and each row's speed relative to the first row."""
    for row in rows:
        row["sentences_per_second"] = row["sentences"] / row["seconds"]
        row["tokens_per_second"] = row["tokens"] / row["seconds"]
        row["speedup"] = row["sentences_per_second"] / (rows[0]["sentences"] / rows[0]["seconds"])
    return rows


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def markdown(rows: Sequence[Dict], best: Optional[Tuple[str, str, float]], settings: str) -> str:
    lines = ["| model | format | BLEU | size on disk | sentences/s | target tokens/s | speed vs first row |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['format']} | {r['bleu']:.2f} | {megabytes(r['bytes'])} | "
                     f"{r['sentences_per_second']:.1f} | {r['tokens_per_second']:.0f} | {r['speedup']:.2f}x |")
    notes = [""]
    if best:
        notes.append(f"best KD student: {best[0]} (test BLEU {best[2]:.2f} in the results table)")
    notes.append(settings)
    return "\n".join(lines + notes) + "\n"


def parse_pairs(values: Sequence[str], parts: int, flag: str) -> List[Tuple[str, ...]]:
    out = []
    for value in values:
        fields = value.rsplit("=", parts - 1)
        if len(fields) != parts or not all(fields):
            form = "NAME=CHECKPOINT" if parts == 2 else "NAME=CHECKPOINT=HYP_FILE"
            raise DistillationError(f"{flag} {value}: expected {form}")
        out.append(tuple(fields))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fairseq_kd.deployment", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="binarized data folder (dict.SRC.txt, dict.TGT.txt)")
    p.add_argument("--src-text", required=True, help="raw source text of the test set")
    p.add_argument("--ref", required=True, help="raw reference translations of the test set")
    p.add_argument("--model", action="append", default=[], help="NAME=CHECKPOINT, always in the table (repeatable)")
    p.add_argument("--candidate", action="append", default=[],
                   help="NAME=CHECKPOINT=HYP_FILE; the candidate whose HYP_FILE scores best joins the table")
    p.add_argument("--out-dir", required=True, help="fp32 checkpoints, int8 exports and translations")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--json", help="write the measurements here")
    p.add_argument("--beam", type=int, default=4, help="beam size")
    p.add_argument("--lenpen", type=float, default=1.0, help="length penalty")
    p.add_argument("--max-len-a", type=float, default=1.2, help="at most a * (source length + 1) + b target tokens")
    p.add_argument("--max-len-b", type=int, default=10, help="see --max-len-a")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per batch (input order)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of both formats")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    with exit_on_error("deployment"):
        from fairseq_kd.checkpoints import install_checkpoint_loader, install_safe_globals
        from fairseq_kd.scoring import read_text

        install_safe_globals()
        install_checkpoint_loader()
        lines, refs = read_text(args.src_text), read_text(args.ref)
        if len(lines) != len(refs):
            raise DistillationError(f"{args.src_text} has {len(lines)} lines, {args.ref} {len(refs)}")
        models = parse_pairs(args.model, 2, "--model")
        best = None
        if args.candidate:
            best = best_candidate(parse_pairs(args.candidate, 3, "--candidate"), refs)
            models.append(best[:2])
        if not models:
            raise DistillationError("nothing to measure: pass --model and/or --candidate")
        os.makedirs(args.out_dir, exist_ok=True)
        rows = []
        for name, checkpoint in models:
            rows.extend(measure(name, checkpoint, args, lines, refs))
        finish_rows(rows)
        settings = (f"{len(lines)} sentences, beam {args.beam}, batches of {args.batch_size} in input order, "
                    f"{args.threads} thread(s); size: fairseq checkpoint without optimizer state, "
                    f"CTranslate2 folder (weights, vocabulary, spm.model)")
        text = markdown(rows, best, settings)
        for path, content in ((args.markdown, text), (args.json, json.dumps(rows, indent=1))):
            if path:
                tmp = f"{path}.tmp{os.getpid()}"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(content)
                os.replace(tmp, path)
        print(text, end="")


if __name__ == "__main__":
    main()
