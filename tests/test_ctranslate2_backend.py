"""The CTranslate2 decoding backend against the fairseq backend on real data.

Both decode the test split of the session's Multi30k slice with the session's
teacher through the ``decode`` command (2 shards, beam 2, n-best 2); the
outputs must be line-aligned (same ids, same sources, as many hypotheses) and
the float32 translations mostly identical.  The conversion is cached next to
the checkpoint under its sha256 and rebuilt when the checkpoint changes.
"""

import json
import os
import shutil

import pytest

from tests import cli

ctranslate2 = pytest.importorskip(
    "ctranslate2", reason="ctranslate2 is not installed (pip install 'fairseq-kd[ct2]'); the backend cannot run"
)


def decode(prepared, ckpt, out_dir, *extra):
    cli.run("fairseq_kd.decoding", [
        "decode", "--data", prepared.bin, "--split", "test", "--path", ckpt, "--out-dir", out_dir,
        "--beam", "2", "--nbest", "2", "--max-len-a", "1.2", "--max-len-b", "10",
        "--num-shards", "2", "--cpu", "--batch-size", "16", "--no-progress-bar", *extra,
    ])
    records = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".jsonl"):
            with open(os.path.join(out_dir, name), encoding="utf-8") as f:
                for line in f:
                    rec = json.loads(line)
                    records[rec["id"]] = rec
    return records


@pytest.fixture(scope="module")
def teacher_copy(teacher_ckpt, tmp_path_factory):
    """The session teacher in a directory of its own (the conversion is cached next to it)."""
    path = str(tmp_path_factory.mktemp("ct2_teacher") / "checkpoint_last.pt")
    shutil.copy(teacher_ckpt, path)
    return path


def conversions(ckpt):
    folder = os.path.dirname(ckpt)
    return sorted(n for n in os.listdir(folder) if ".ct2-" in n)


def test_ctranslate2_output_matches_fairseq_backend(prepared, teacher_copy, tmp_path):
    from fairseq_kd.decoding.ctranslate2_backend import converted_dir
    from fairseq_kd.hashing import sha256_of

    ref = decode(prepared, teacher_copy, str(tmp_path / "fairseq"))
    ct2 = decode(prepared, teacher_copy, str(tmp_path / "ct2"), "--backend", "ctranslate2",
                 "--ct2-compute-type", "float32")

    # line-aligned: the same examples, sources and references, the same number of hypotheses
    assert sorted(ref) == sorted(ct2) == list(range(50))
    for i in ref:
        assert ct2[i]["src"] == ref[i]["src"] and ct2[i]["ref"] == ref[i]["ref"]
        assert len(ct2[i]["hyps"]) == len(ref[i]["hyps"]) == 2
    best_equal = sum(ct2[i]["hyps"][0]["text"] == ref[i]["hyps"][0]["text"] for i in ref)
    assert best_equal >= 0.9 * len(ref), f"only {best_equal}/{len(ref)} best hypotheses identical"
    nbest_equal = sum([h["text"] for h in ct2[i]["hyps"]] == [h["text"] for h in ref[i]["hyps"]] for i in ref)
    assert nbest_equal >= 0.8 * len(ref), f"only {nbest_equal}/{len(ref)} 2-best lists identical"

    # the conversion is cached next to the checkpoint, keyed by its sha256
    sha = sha256_of(teacher_copy)
    assert conversions(teacher_copy) == [os.path.basename(converted_dir(teacher_copy, sha))]
    with open(os.path.join(converted_dir(teacher_copy, sha), "fairseq_kd_source.json")) as f:
        assert json.load(f)["sha256"] == sha

    # merge: one line per source line for both backends
    for name in ("fairseq", "ct2"):
        cli.run("fairseq_kd.decoding", ["merge", "--out-dir", str(tmp_path / name), "--output",
                                        str(tmp_path / f"{name}.txt"), "--select", "bleu", "--no-progress-bar"])
        with open(tmp_path / f"{name}.txt", encoding="utf-8") as f:
            assert len(f.read().splitlines()) == 50


def test_conversion_reused_and_rebuilt_when_stale(prepared, teacher_copy, tmp_path):
    from fairseq_kd.decoding.ctranslate2_backend import converted_dir
    from fairseq_kd.hashing import sha256_of

    decode(prepared, teacher_copy, str(tmp_path / "a"), "--backend", "ctranslate2", "--ct2-compute-type", "int8")
    first = converted_dir(teacher_copy, sha256_of(teacher_copy))
    stamp = os.stat(os.path.join(first, "model.bin")).st_mtime_ns
    decode(prepared, teacher_copy, str(tmp_path / "b"), "--backend", "ctranslate2")
    assert os.stat(os.path.join(first, "model.bin")).st_mtime_ns == stamp  # reused, not rebuilt

    # the checkpoint changes (same name): a new conversion, the stale one is not read
    import torch

    from fairseq_kd.checkpoints import install_safe_globals

    install_safe_globals()
    state = torch.load(teacher_copy, map_location="cpu")
    state["extra_state"] = dict(state.get("extra_state") or {}, note="retrained")
    torch.save(state, teacher_copy)
    second = converted_dir(teacher_copy, sha256_of(teacher_copy))
    assert second != first
    out = decode(prepared, teacher_copy, str(tmp_path / "c"), "--backend", "ctranslate2")
    assert len(out) == 50
    assert os.path.isfile(os.path.join(second, "model.bin"))
    assert sorted(conversions(teacher_copy)) == sorted(os.path.basename(p) for p in (first, second))  # no .tmp left


def test_ctranslate2_refuses_an_ensemble_and_unkpen(prepared, teacher_copy, tmp_path):
    proc = cli.run("fairseq_kd.decoding", [
        "decode", "--data", prepared.bin, "--split", "test", "--path", f"{teacher_copy}:{teacher_copy}",
        "--out-dir", str(tmp_path / "e"), "--cpu", "--backend", "ctranslate2", "--no-progress-bar",
    ], check=False)
    assert proc.returncode != 0 and "decodes one teacher checkpoint, got 2" in proc.stderr
    proc = cli.run("fairseq_kd.decoding", [
        "decode", "--data", prepared.bin, "--split", "test", "--path", teacher_copy, "--unkpen", "1",
        "--out-dir", str(tmp_path / "u"), "--cpu", "--backend", "ctranslate2", "--no-progress-bar",
    ], check=False)
    assert proc.returncode != 0 and "--unkpen 1.0 has no CTranslate2 equivalent" in proc.stderr
