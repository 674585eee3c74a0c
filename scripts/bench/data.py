"""The benchmark's data and teachers: Multi30k binarized at each vocabulary size, the teacher trained once and its stand-in at the padded vocabulary; docs/performance.md."""

import json
import os
import shutil

from bench.common import ARCHS, CORPUS, SRC, TEACHER_TARGET_SUBSET, TGT, quiet_logging


def finished_info(out):
    """The info of the data folder ``out`` finished by an earlier run, or None after emptying it."""
    info_path = os.path.join(out, "info.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            return json.load(f)
    shutil.rmtree(out, ignore_errors=True)
    return None


def write_info(out, info):
    """``out``'s info.json, written last (under a temporary name, then renamed): it marks the folder finished."""
    info_path = os.path.join(out, "info.json")
    with open(info_path + ".tmp", "w") as f:
        json.dump(info, f)
    os.replace(info_path + ".tmp", info_path)
    return info


def pad_vocab(base, work, nominal):
    """The data of ``base`` (:func:`prepare_vocab`) with its dictionary padded by unused symbols up to
    ``nominal`` entries: the same text and token ids, an output layer and ``[tokens, V]`` tensors of a
    ``nominal``-entry vocabulary."""
    from fairseq.data import Dictionary

    out = os.path.join(work, f"v{nominal}")
    info = finished_info(out)
    if info is not None:
        return info
    bin_dir = os.path.join(out, "bin")
    shutil.copytree(base["bin"], bin_dir)
    d = Dictionary.load(os.path.join(bin_dir, f"dict.{SRC}.txt"))
    padding = 0
    while len(d) < nominal:
        d.add_symbol(f"madeupword{padding:05d}", n=0)
        padding += 1
    for lang in (SRC, TGT):
        d.save(os.path.join(bin_dir, f"dict.{lang}.txt"))
    padding += base["padding_symbols"]
    return write_info(out, dict(base, nominal=nominal, vocab=len(d), padding_symbols=padding, bin=bin_dir,
                                padded_from=base["nominal"]))


#: the logit of every row the stand-in teacher adds: ~24,000 rows then hold below 1e-13 of its mass
ADDED_ROW_LOGIT = -40.0


def added_rows(state, rows: int, logit: float = ADDED_ROW_LOGIT):
    """``rows`` output rows on which the decoder of checkpoint ``state`` scores ``logit`` at every position.

    The decoder's features are a layer norm's output ``h = g * z + b`` with ``z`` of zero mean over the
    features, so the row ``w = c / g`` scores ``h . w = c * sum(b / g)`` whatever ``z`` is (fairseq's output
    layer has no bias to set instead); ``c`` makes that ``logit``."""
    import torch

    model = state["model"]
    if "decoder.layer_norm.weight" in model:  # pre-norm: the decoder's last layer norm
        norm = "decoder.layer_norm"
    else:  # post-norm: the last layer's
        last = max(int(k.split(".")[2]) for k in model if k.startswith("decoder.layers."))
        norm = f"decoder.layers.{last}.final_layer_norm"
    g, b = model[norm + ".weight"].double(), model[norm + ".bias"].double()
    s = float((b / g).sum())
    if g.abs().min() < 1e-3 or abs(s) < 1e-6:
        raise SystemExit(f"benchmark: the teacher's {norm} cannot pin the added rows' logit (min |g| "
                         f"{float(g.abs().min()):.2g}, sum(b/g) {s:.2g}); train it longer (--teacher-updates)")
    row = (logit / s) / g
    z = torch.randn(64, g.numel(), dtype=torch.float64)
    z = (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True)
    assert torch.allclose((g * z + b) @ row, torch.full((64,), logit, dtype=torch.float64), atol=1e-6)
    return row.to(model[norm + ".weight"].dtype).expand(rows, -1).clone()


def pad_teacher(base_path, info, save_dir):
    """``base_path``'s teacher with rows appended to its embeddings and output layer for the padding
    symbols of ``info``, scored :data:`ADDED_ROW_LOGIT` at every position (:func:`added_rows`: they hold no
    mass, as a trained teacher's unused rows do, and it translates as the base teacher does), its data
    directory set to ``info``'s; read by the safe loader, written atomically."""
    import torch
    from omegaconf import OmegaConf

    from fairseq_kd.checkpoints import load_checkpoint_state

    path = os.path.join(save_dir, "checkpoint_last.pt")
    if os.path.isfile(path):
        return path
    state = load_checkpoint_state(base_path)
    for key, weight in list(state["model"].items()):  # shared embeddings: each name of the one matrix
        if key.endswith(("embed_tokens.weight", "output_projection.weight")) and weight.size(0) < info["vocab"]:
            state["model"][key] = torch.cat([weight, added_rows(state, info["vocab"] - weight.size(0))])
    cfg = state["cfg"]
    OmegaConf.set_struct(cfg, False)
    cfg.task.data = info["bin"]
    state["cfg"] = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    recorded = (state.get("task_state") or {}).get("dictionary_sha256")
    if recorded:  # the padded dictionaries are the ones it is trained with now
        from fairseq_kd.hashing import sha256_of

        for name in list(recorded):
            recorded[name] = sha256_of(os.path.join(info["bin"], name))
    os.makedirs(save_dir, exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def prepare_vocab(data_root, work, nominal, limits, threads, train_pairs=None):
    """Joint SentencePiece (``hard_vocab_limit`` off: a small corpus may not hold ``nominal`` pieces) and
    a fairseq dictionary padded with unused symbols up to ``nominal`` entries, both learnt from the
    training pairs of ``limits``; only the first ``train_pairs`` of them are binarized (the batches timed,
    the cache and the decoding teacher need no more).  Returns the data info."""
    import sentencepiece as spm
    from fairseq.data import Dictionary

    from fairseq_kd.corpora import locate_corpus
    from fairseq_kd.prepare import encode, slice_corpus

    out = os.path.join(work, f"v{nominal}")
    bin_dir = os.path.join(out, "bin")
    info = finished_info(out)
    if info is not None:
        return info
    raw = os.path.join(out, "raw")
    slice_corpus(locate_corpus(CORPUS, data_root), raw, (SRC, TGT), limits)
    prefix = os.path.join(out, "spm")
    spm.SentencePieceTrainer.train(
        input=",".join(os.path.join(raw, f"train.{lang}") for lang in (SRC, TGT)), model_prefix=prefix,
        vocab_size=nominal, hard_vocab_limit=False, character_coverage=1.0, model_type="unigram",
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, num_threads=threads, minloglevel=2,
    )
    pieces = spm.SentencePieceProcessor(model_file=prefix + ".model").get_piece_size()
    spm_text = os.path.join(out, "spm_text")
    encode(prefix + ".model", raw, spm_text, (SRC, TGT))
    d = Dictionary()
    for lang in (SRC, TGT):
        Dictionary.add_file_to_dictionary(os.path.join(spm_text, f"train.{lang}"), d, lambda s: s.split(), 1)
    d.finalize(padding_factor=8)
    padding = 0
    while len(d) < nominal:
        d.add_symbol(f"madeupword{padding:05d}", n=0)
        padding += 1
    os.makedirs(out, exist_ok=True)
    dict_file = os.path.join(out, "dict.txt")
    d.save(dict_file)
    from fairseq import options
    from fairseq_cli import preprocess

    trainpref = os.path.join(spm_text, "train")
    if train_pairs:
        for lang in (SRC, TGT):
            with open(f"{trainpref}.{lang}", encoding="utf-8") as f, \
                    open(f"{trainpref}_bin.{lang}", "w", encoding="utf-8") as head:
                for i, line in enumerate(f):
                    if i == train_pairs:
                        break
                    head.write(line)
        trainpref += "_bin"
    preprocess.main(options.get_preprocessing_parser().parse_args([
        "--source-lang", SRC, "--target-lang", TGT,
        "--trainpref", trainpref, "--validpref", os.path.join(spm_text, "valid"),
        "--testpref", os.path.join(spm_text, "test"), "--destdir", bin_dir, "--srcdict", dict_file,
        "--tgtdict", dict_file, "--workers", "1",
    ]))
    # Seq-KD's training targets: the gold targets stand in for the teacher's translations (same step cost)
    for ext in ("bin", "idx"):
        shutil.copy(os.path.join(bin_dir, f"train.{SRC}-{TGT}.{TGT}.{ext}"),
                    os.path.join(bin_dir, f"{TEACHER_TARGET_SUBSET}.{SRC}-{TGT}.{TGT}.{ext}"))
    return write_info(out, {"nominal": nominal, "vocab": len(d), "sentencepiece_pieces": pieces,
                            "padding_symbols": padding, "bin": bin_dir, "raw": raw,
                            "train_pairs_binarized": train_pairs})


def arch_args(arch):
    a = ARCHS[arch]
    return [
        "--arch", "transformer", "--share-all-embeddings",
        "--encoder-layers", str(a["layers"]), "--decoder-layers", str(a["layers"]),
        "--encoder-embed-dim", str(a["dim"]), "--decoder-embed-dim", str(a["dim"]),
        "--encoder-ffn-embed-dim", str(a["ffn"]), "--decoder-ffn-embed-dim", str(a["ffn"]),
        "--encoder-attention-heads", str(a["heads"]), "--decoder-attention-heads", str(a["heads"]),
    ]


def train_teacher(bin_dir, save_dir, arch, updates, max_tokens):
    """A teacher checkpoint by fairseq-train's ``main`` in this process (``updates`` updates of plain
    label-smoothed training)."""
    from fairseq import options
    from fairseq.distributed import utils as distributed_utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli.train import main as train_main

    path = os.path.join(save_dir, "checkpoint_last.pt")
    if os.path.isfile(path):
        return path
    argv = [bin_dir, "--save-dir", save_dir, *arch_args(arch),
         "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--dropout", "0.1",
         "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.002", "--lr-scheduler", "inverse_sqrt",
         "--warmup-updates", str(max(1, min(100, updates // 3))), "--max-tokens", str(max_tokens),
         "--max-update", str(updates), "--cpu", "--seed", "1", "--no-epoch-checkpoints",
         "--no-save-optimizer-state", "--num-workers", "0", "--log-format", "simple",
         "--log-interval", "50", "--no-progress-bar", "--disable-validation"]
    quiet_logging()  # fairseq_cli.train logs to stdout, where the table goes
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # not timed: every core
    try:
        distributed_utils.call_main(cfg, train_main)
    finally:
        torch.set_num_threads(threads)
    if not os.path.isfile(path):
        raise SystemExit(f"benchmark: fairseq-train wrote no {path}")
    return path


# ---- one training setup: task, student, criterions, optimizer, batches ------------------------------------------------


