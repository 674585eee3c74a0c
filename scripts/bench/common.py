"""The benchmark's settings (vocabularies, architectures, criterions) and process helpers; scripts/benchmark.py, docs/performance.md."""

import os
import subprocess
import sys
import time


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

CORPUS = "multi30k_en_de"
SRC, TGT = "en", "de"
NOMINAL_VOCABS = (8000, 32000)

#: full run: the 256-dim 3+3-layer transformer of docs/performance.md; quick: a tiny one
ARCHS = {
    "full": dict(dim=256, ffn=1024, layers=3, heads=4),
    "quick": dict(dim=64, ffn=128, layers=1, heads=2),
}

#: NAME -> criterion arguments; every KD criterion with its defaults unless named
CRITERIA = {
    "label_smoothed_cross_entropy": ["--criterion", "label_smoothed_cross_entropy"],
    "word_kd": ["--criterion", "word_kd"],
    "word_kd_rkl": ["--criterion", "word_kd", "--kd-divergence", "rkl"],
    "word_kd_skl": ["--criterion", "word_kd", "--kd-divergence", "skl"],
    "word_kd_srkl": ["--criterion", "word_kd", "--kd-divergence", "srkl"],
    "word_kd_jsd": ["--criterion", "word_kd", "--kd-divergence", "jsd"],
    "tie_kd": ["--criterion", "tie_kd", "--tie-iterations", "3"],
    "self_evolution_kd": ["--criterion", "self_evolution_kd"],
    "hybrid_gated_kd": ["--criterion", "hybrid_gated_kd", "--hybrid-sent-target", "greedy-online"],
    "selective_kd": ["--criterion", "selective_kd"],
    "seq_kd": ["--criterion", "seq_kd"],
    # every batch on-policy (the most it costs): the student's sampled translation, then the teacher on it; the
    # KL as word_kd's row (the JSD's own cost is word_kd_jsd's row next to word_kd's)
    "on_policy_kd": ["--criterion", "on_policy_kd", "--on-policy-lambda", "1", "--kd-divergence", "kl"],
}
#: criterions run from the offline top-k cache (NAME_cached); the rest need the live teacher
CACHED = {
    "word_kd": CRITERIA["word_kd"],
    "word_kd_rkl": CRITERIA["word_kd_rkl"],
    "word_kd_skl": CRITERIA["word_kd_skl"],
    "word_kd_srkl": CRITERIA["word_kd_srkl"],
    "self_evolution_kd": CRITERIA["self_evolution_kd"],
    "selective_kd": CRITERIA["selective_kd"],
    "hybrid_gated_kd": ["--criterion", "hybrid_gated_kd", "--hybrid-sent-target", "offline"],
}
PLAIN = "label_smoothed_cross_entropy"
TEACHER_TARGET_SUBSET = "train_bench_teacher"
CACHE_K = 8


def log(msg):
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def child_env(threads):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def quiet_logging():
    """fairseq's warnings only, on stderr (its command-line modules configure INFO logging to stdout)."""
    import logging

    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    root.setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("fairseq", "fairseq_cli", "fairseq_kd")):
            logging.getLogger(name).setLevel(logging.WARNING)


def run(cmd, threads, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads), cwd=REPO, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark: {' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


# ---- data: one binarized Multi30k per vocabulary size ----------------------------------------------------------------

