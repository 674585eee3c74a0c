"""``fairseq-kd-export``: a fairseq checkpoint as a CTranslate2 model folder that translates raw text.

``export`` converts one checkpoint (the project's, or fairseq's old ``args`` format with fp16
weights) with the conversion of :mod:`fairseq_kd.decoding.ctranslate2_backend`, weights in
float32, int8 or int8_float16, and copies the segmentation model next to it (SentencePiece
``spm.model``, or BPE ``bpecodes`` with Moses tokenization); ``translate`` reads raw text,
segments it, decodes with CTranslate2 (greedy or beam) and writes desegmented text.  See
docs/export.md.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import time
from typing import Dict, List, Optional, Sequence

from fairseq_kd.errors import DistillationError, exit_on_error

logger = logging.getLogger("fairseq_kd.export")

QUANTIZATIONS = ("float32", "int8", "int8_float16")
RECORD = "fairseq_kd_export.json"
SEGMENTERS = {"spm": "spm.model", "bpe": "bpecodes"}


def find_segmentation(data: str, spm_model: Optional[str], bpe_codes: Optional[str]):
    """``(kind, path)`` of the segmentation model: the one given, else ``spm.model`` or ``bpecodes``
    in the binarized data folder or its parent (where ``fairseq-kd-prepare`` writes them)."""
    if spm_model and bpe_codes:
        raise DistillationError("pass --spm-model or --bpe-codes, not both")
    given = ("spm", spm_model) if spm_model else ("bpe", bpe_codes) if bpe_codes else None
    if given:
        if not os.path.isfile(given[1]):
            raise DistillationError(f"segmentation model {given[1]} not found")
        return given
    for folder in (data, os.path.dirname(os.path.abspath(data))):
        for kind, name in SEGMENTERS.items():
            if os.path.isfile(os.path.join(folder, name)):
                return kind, os.path.join(folder, name)
    raise DistillationError(
        f"no spm.model or bpecodes in {data} or its parent folder; pass --spm-model FILE or --bpe-codes FILE"
    )


def export(checkpoint: str, data: str, out_dir: str, quantization: str = "int8", spm_model: Optional[str] = None,
           bpe_codes: Optional[str] = None, force: bool = False) -> Dict:
    """Convert ``checkpoint`` (dictionaries in ``data``) into the CTranslate2 folder ``out_dir``
    (written under a temporary name, renamed when complete) and return its record."""
    from fairseq_kd.checkpoints import load_checkpoint_state
    from fairseq_kd.decoding.ctranslate2_backend import convert_model
    from fairseq_kd.hashing import sha256_of
    from fairseq_kd.decoding.fairseq_backend import build_task
    from fairseq_kd.teacher import load_teacher, split_paths

    paths = split_paths(checkpoint)
    if len(paths) != 1:
        raise DistillationError(
            f"--path {checkpoint}: an ensemble of {len(paths)} checkpoints cannot be exported as one model; "
            f"export one, or average them first (fairseq-kd-average-checkpoints)"
        )
    if quantization not in QUANTIZATIONS:
        raise DistillationError(f"unknown --quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
    if os.path.exists(out_dir) and not force:
        raise DistillationError(f"{out_dir} exists; pass --force to replace it or choose another --out-dir")
    kind, segmenter = find_segmentation(data, spm_model, bpe_codes)
    state = load_checkpoint_state(paths[0])  # old `args` checkpoints come back with a `cfg`
    cfg = state.get("cfg") if isinstance(state, dict) else None
    if cfg is None or cfg.get("model") is None or cfg.get("task") is None:
        raise DistillationError(f"{paths[0]} has no model config; pass a checkpoint written by fairseq-train")
    src, tgt = cfg.task.get("source_lang"), cfg.task.get("target_lang")
    task = build_task(data, src, tgt)
    model = load_teacher(paths, task, precision="fp32", teacher_data_dir=data).models[0]
    record = {
        "checkpoint": os.path.abspath(paths[0]),
        "sha256": sha256_of(paths[0]),
        "arch": cfg.model.arch,
        "quantization": quantization,
        "source_lang": task.cfg.source_lang,
        "target_lang": task.cfg.target_lang,
        "segmentation": kind,
        "segmentation_file": SEGMENTERS[kind],
        "max_positions": list(model.max_positions()),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    tmp = f"{out_dir.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_model(model, cfg.model, task, tmp, quantization=quantization)
    except (NotImplementedError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = " ".join(str(e).split())
        raise DistillationError(f"CTranslate2 cannot convert {paths[0]} (arch {cfg.model.arch}): {reason}")
    shutil.copyfile(segmenter, os.path.join(tmp, SEGMENTERS[kind]))
    with open(os.path.join(tmp, RECORD), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    logger.info("exported %s (%s) to %s", paths[0], quantization, out_dir)
    return record


def read_record(model_dir: str) -> Dict:
    path = os.path.join(model_dir, RECORD)
    if not os.path.isfile(path):
        raise DistillationError(f"{model_dir} is not a fairseq-kd-export folder (no {RECORD}); export it first")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Segmenter:
    """Raw text <-> the model's subword tokens: SentencePiece, or Moses + BPE (fairseq's WMT recipes)."""

    def __init__(self, model_dir: str, record: Dict):
        self.kind, self.record = record["segmentation"], record
        path = os.path.join(model_dir, record["segmentation_file"])
        if self.kind == "spm":
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_file=path)
        else:
            self.codes = path

    def encode(self, lines: Sequence[str]) -> List[List[str]]:
        if self.kind == "spm":
            return [self.sp.encode(line, out_type=str) for line in lines]
        from fairseq_kd.prepare_bpe import apply_codes, moses_tokenize

        return [line.split() for line in apply_codes(self.codes, moses_tokenize(lines, self.record["source_lang"]))]

    def decode(self, hyps: Sequence[Sequence[str]]) -> List[str]:
        if self.kind == "spm":
            return [self.sp.decode_pieces(list(h)) for h in hyps]
        from fairseq_kd.scoring_tok import moses_detokenize

        return moses_detokenize([(" ".join(h) + " ").replace("@@ ", "").rstrip() for h in hyps],
                                self.record["target_lang"])


def max_length(record: Dict, sources: Sequence[Sequence[str]], max_len_a: float, max_len_b: int) -> int:
    """fairseq's length cap of a batch: ``a * (longest source + EOS) + b`` tokens, at most positions - 1."""
    longest = max(len(s) for s in sources) + 1
    return min(int(max_len_a * longest + max_len_b), int(record["max_positions"][1]) - 1)


class Exported:
    """An exported model loaded with CTranslate2: raw text in, raw text out."""

    def __init__(self, model_dir: str, device: str = "cpu", threads: int = 1, compute_type: str = "default"):
        import ctranslate2

        self.record = read_record(model_dir)
        self.segmenter = Segmenter(model_dir, self.record)
        self.translator = ctranslate2.Translator(model_dir, device=device, compute_type=compute_type,
                                                 intra_threads=threads, inter_threads=1)

    def translate_tokens(self, sources: Sequence[Sequence[str]], beam: int = 1, max_len_a: float = 0.0,
                         max_len_b: int = 200, lenpen: float = 1.0) -> List[List[str]]:
        """One batch of segmented sources -> the best hypothesis of each (subword tokens)."""
        results = self.translator.translate_batch(
            [list(s) for s in sources], beam_size=beam, length_penalty=lenpen, max_batch_size=0,
            max_decoding_length=max_length(self.record, sources, max_len_a, max_len_b),
        )
        return [r.hypotheses[0] for r in results]

    def translate(self, lines: Sequence[str], batch_size: int = 32, **options) -> List[str]:
        sources = self.segmenter.encode(lines)
        hyps = []
        for i in range(0, len(sources), batch_size):
            hyps.extend(self.translate_tokens(sources[i:i + batch_size], **options))
        return self.segmenter.decode(hyps)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fairseq-kd-export",
        description="Export a fairseq checkpoint as a CTranslate2 model folder, and translate raw text with it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="checkpoint -> CTranslate2 folder with vocabulary and segmentation model")
    e.add_argument("--path", required=True, help="the fairseq checkpoint (one file; an ensemble is refused)")
    e.add_argument("--data", required=True, help="the binarized data folder holding dict.SRC.txt and dict.TGT.txt")
    e.add_argument("--out-dir", required=True, help="the CTranslate2 model folder to write")
    e.add_argument("--quantization", default="int8", choices=QUANTIZATIONS,
                   help="weight type (int8_float16 computes in float16 on a GPU and in int8 on a CPU)")
    e.add_argument("--spm-model", help="SentencePiece model (default: spm.model in --data or its parent)")
    e.add_argument("--bpe-codes", help="BPE codes (Moses + subword-nmt; default: bpecodes in --data or its parent)")
    e.add_argument("--force", action="store_true", help="replace an existing --out-dir")
    t = sub.add_parser("translate", help="translate a raw text file with an exported folder")
    t.add_argument("--model", required=True, help="a folder written by `fairseq-kd-export export`")
    t.add_argument("--input", required=True, help="raw source text, one sentence per line")
    t.add_argument("--output", required=True, help="raw translations, one per line (written when complete)")
    t.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    t.add_argument("--lenpen", type=float, default=1.0, help="length penalty (fairseq's --lenpen)")
    t.add_argument("--max-len-a", type=float, default=0.0, help="at most a * source length + b target tokens")
    t.add_argument("--max-len-b", type=int, default=200, help="see --max-len-a (fairseq's defaults: 0, 200)")
    t.add_argument("--batch-size", type=int, default=32, help="sentences per batch")
    t.add_argument("--threads", type=int, default=1, help="CPU threads")
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--compute-type", default="default",
                   help="CTranslate2 compute type (default: the exported weight type, or the nearest the device runs)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=os.environ.get("LOGLEVEL", "INFO").upper(), stream=sys.stderr, force=True)
    args = build_parser().parse_args(argv)
    with exit_on_error("fairseq-kd-export"):
        if args.command == "export":
            from fairseq_kd.checkpoints import install_checkpoint_loader, install_safe_globals

            install_safe_globals()  # safe checkpoint loading (weights_only, fairseq's classes allow-listed)
            install_checkpoint_loader()

            try:
                import ctranslate2  # noqa: F401
            except ImportError:
                raise DistillationError("export needs the ctranslate2 package: pip install 'fairseq-kd[ct2]'")
            record = export(args.path, args.data, args.out_dir, args.quantization, args.spm_model, args.bpe_codes,
                            args.force)
            print(json.dumps(dict(record, out_dir=os.path.abspath(args.out_dir),
                                  bytes=folder_bytes(args.out_dir)), indent=1))
            return
        from fairseq_kd.textio import read_text_lines

        lines = read_text_lines(args.input)
        model = Exported(args.model, device=args.device, threads=args.threads, compute_type=args.compute_type)
        start = time.perf_counter()
        hyps = model.translate(lines, batch_size=args.batch_size, beam=args.beam, lenpen=args.lenpen,
                               max_len_a=args.max_len_a, max_len_b=args.max_len_b)
        seconds = time.perf_counter() - start
        tmp = f"{args.output}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(h + "\n" for h in hyps)
        os.replace(tmp, args.output)
        logger.info("translated %d lines in %.1f s -> %s", len(hyps), seconds, args.output)


if __name__ == "__main__":
    main()
