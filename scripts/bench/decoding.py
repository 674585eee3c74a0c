"""The offline top-k cache built by its own command, and teacher decoding: fairseq-generate, the fairseq backend and CTranslate2, timed and scored."""

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from bench.common import CACHE_K, REPO, SRC, TGT, log, run


# ---- the offline top-k cache ------------------------------------------------------------------------------------------


def build_cache(bin_dir, teacher, out_dir, threads):
    """The k = 8 top-k cache of the training split, built by the cache's own command
    (``python -m fairseq_kd.cache build``); returns (dir, data bytes per target token,
    index bytes per target token)."""
    from fairseq.data import data_utils

    if not os.path.isfile(os.path.join(out_dir, "manifest.json")):
        run([sys.executable, "-m", "fairseq_kd.cache", "build", "--data", bin_dir, "--split", "train",
             "--path", teacher, "--out-dir", out_dir, "--k", str(CACHE_K), "--cpu", "--no-progress-bar"], threads)
    # keep the dataset alive while its sizes are read: they are a view of its memory map
    target = data_utils.load_indexed_dataset(os.path.join(bin_dir, f"train.{SRC}-{TGT}.{TGT}"), None, None)
    tokens = int(target.sizes.sum())
    del target
    data = index = 0
    for folder, _, files in os.walk(out_dir):
        for name in files:
            data += os.path.getsize(os.path.join(folder, name)) if name.endswith(".bin") else 0
            index += os.path.getsize(os.path.join(folder, name)) if name.endswith(".idx") else 0
    return out_dir, data / tokens, index / tokens


# ---- teacher decoding ------------------------------------------------------------------------------------------------


def bleu(hyps, refs):
    import sacrebleu

    return sacrebleu.corpus_bleu(hyps, [refs]).score


def decode_fairseq_generate(bin_dir, teacher, beam, max_tokens, threads, n):
    from fairseq_kd.scoring import read_generate_output

    proc = run([sys.executable, "-m", "fairseq_cli.generate", bin_dir, "--user-dir", os.path.join(REPO, "user_dir"),
                "--path", teacher, "--gen-subset", "test", "--beam", str(beam), "--max-tokens", str(max_tokens),
                "--max-len-a", "1.2", "--max-len-b", "10", "--required-batch-size-multiple", "1",
                "--remove-bpe", "sentencepiece", "--cpu", "--num-workers", "0"], threads)
    import re

    m = re.search(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s \(([\d.]+) sentences/s",
                  proc.stdout + proc.stderr)
    if not m:
        raise SystemExit("benchmark: fairseq-generate printed no 'Translated N sentences' line")
    count = int(m.group(1).replace(",", ""))
    seconds = count / float(m.group(4))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(proc.stdout)
    hyps = read_generate_output(f.name)
    os.unlink(f.name)
    if count != n or len(hyps) != n:
        raise SystemExit(f"benchmark: fairseq-generate translated {len(hyps)} of {n} sentences")
    return seconds, [hyps[i] for i in range(n)]


def decode_backend(backend, corpus, max_tokens, out_dir):
    from fairseq_kd.decoding import decode_corpus, remove_bpe

    shutil.rmtree(out_dir, ignore_errors=True)
    start = time.perf_counter()
    decode_corpus(corpus, backend.translate, out_dir, max_tokens=max_tokens,
                  max_source_len=backend.max_source_len, progress=False)
    seconds = time.perf_counter() - start
    hyps = {}
    for name in os.listdir(out_dir):
        if name.endswith(".jsonl"):
            with open(os.path.join(out_dir, name), encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    hyps[rec["id"]] = remove_bpe(rec["hyps"][0]["text"], "sentencepiece") if rec["hyps"] else ""
    return seconds, [hyps[i] for i in range(len(corpus))]


def benchmark_decoding(bin_dir, raw_dir, teacher, reps, beam, max_tokens, threads, work):
    import torch

    from fairseq_kd.decoding import corpus_from_split
    from fairseq_kd.decoding.ctranslate2_backend import CTranslate2Backend
    from fairseq_kd.decoding.fairseq_backend import FairseqBackend, build_task

    with open(os.path.join(raw_dir, f"test.{TGT}"), encoding="utf-8") as f:
        refs = [line.rstrip("\n") for line in f]
    task = build_task(bin_dir, SRC, TGT)
    corpus = corpus_from_split(bin_dir, "test", SRC, TGT, task.source_dictionary, task.target_dictionary)
    n = len(corpus)
    settings = {"beam": beam, "nbest": 1, "max_len_a": 1.2, "max_len_b": 10, "min_len": 1, "lenpen": 1.0,
                "unkpen": 0.0, "teacher": [teacher]}
    cpu = torch.device("cpu")
    backends = {"fairseq_backend": FairseqBackend(task, teacher, settings, cpu)}
    for ct in ("float32", "int8"):
        backends[f"ct2_{ct}"] = CTranslate2Backend(task, teacher, settings, cpu, compute_type=ct)
    names = ["fairseq_generate"] + list(backends)
    seconds = {k: [] for k in names}
    outputs = {}
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            if name == "fairseq_generate":
                s, hyps = decode_fairseq_generate(bin_dir, teacher, beam, max_tokens, threads, n)
            else:
                s, hyps = decode_backend(backends[name], corpus, max_tokens, os.path.join(work, "decode", name))
            seconds[name].append(s)
            outputs[name] = hyps
            log(f"decode {name}: {n / s:.1f} sentences/s")
    result = {}
    for name in names:
        sec = statistics.median(seconds[name])
        result[name] = {"sentences_per_second": n / sec, "seconds": sec, "bleu": bleu(outputs[name], refs)}
    result["sentences"] = n
    return result


# ---- report ----------------------------------------------------------------------------------------------------------


