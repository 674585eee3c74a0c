"""fairseq's published WMT teachers through --teacher-dir, with fake archives laid out like the real ones.

The real archives (examples/translation/README.md of fairseq) hold old-format checkpoints (``args``, no
``cfg``) of ``transformer_vaswani_wmt_en_de_big`` / ``transformer_wmt_en_de_big`` models with fp16 weights,
joined dictionaries and the BPE codes they were trained with:

* ``wmt14.en-fr.joined-dict.transformer/``: ``model.pt``, subword-nmt ``bpecodes``, ``tokenizer.perl -a``;
* ``wmt16.en-de.joined-dict.transformer/``: ``model.pt``, subword-nmt ``bpecodes``, text tokenized without
  ``-a`` (no ``@-@`` in its dictionary);
* ``wmt19.{en-de,de-en}.joined-dict.ensemble/``: ``model1.pt`` ... ``model4.pt``, fastBPE ``bpecodes``
  (``a b count`` lines), ``-a``; ``wmt19.en-de.joined-dict.single_model/``: ``model.pt``, fastBPE codes.

The fakes keep the layout, the checkpoint format, the architecture name and the codes format, with the
dimensions tiny-fied (the big architecture itself is 200M+ parameters).
"""

import argparse
import os
import shutil
from dataclasses import dataclass

import pytest

from tests import cli
from tests.test_wmt_recipes import WMT_RUN, read, run_recipe, started

DATA = cli.SHARED_DATA


@dataclass(frozen=True)
class Layout:
    name: str
    src: str
    tgt: str
    corpus: str
    test_from_valid: int
    models: int
    codes: str  # subword-nmt | fastbpe
    aggressive: bool


LAYOUTS = {
    "wmt14.en-fr": Layout("wmt14.en-fr.joined-dict.transformer", "en", "fr", "multi30k_en_fr", 0, 1, "subword-nmt", True),
    "wmt16.en-de": Layout("wmt16.en-de.joined-dict.transformer", "en", "de", "opennmt_toy_en_de", 30, 1, "subword-nmt", False),
    "wmt19.en-de": Layout("wmt19.en-de.joined-dict.ensemble", "en", "de", "opennmt_toy_en_de", 30, 4, "fastbpe", True),
    "wmt19.en-de.single": Layout("wmt19.en-de.joined-dict.single_model", "en", "de", "opennmt_toy_en_de", 30, 1,
                                 "fastbpe", True),
    "wmt19.de-en": Layout("wmt19.de-en.joined-dict.ensemble", "de", "en", "opennmt_toy_en_de", 30, 4, "fastbpe", True),
}


def old_format(state, seed):
    """A fairseq 0.6-0.9 style checkpoint of ``state``: ``args`` (an argparse.Namespace), no ``cfg``,
    fp16 weights, the big architecture's name."""
    import torch
    from omegaconf import OmegaConf

    args = argparse.Namespace()
    for section in ("common", "distributed_training", "dataset", "optimization", "checkpoint", "generation",
                    "task", "criterion", "optimizer", "lr_scheduler", "model"):
        part = state["cfg"].get(section)
        if isinstance(part, argparse.Namespace):  # the model config of a legacy architecture
            vars(args).update(vars(part))
        elif part is not None:
            vars(args).update(OmegaConf.to_container(part, resolve=True))
    args.arch = "transformer_vaswani_wmt_en_de_big"
    args.task, args.criterion, args.optimizer, args.lr_scheduler = ("translation", "label_smoothed_cross_entropy",
                                                                    "adam", "inverse_sqrt")
    args.data = "/private/home/fairseq/data-bin/wmt_joined_dict"  # where the model was trained: absent here
    gen = torch.Generator().manual_seed(seed)
    model = {k: (v + 0.01 * torch.randn(v.shape, generator=gen) * (seed > 0)).half() if v.is_floating_point() else v
             for k, v in state["model"].items()}
    return {"args": args, "model": model, "extra_state": {"train_iterator": {"epoch": 30}},
            "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion", "optimizer_name": "FairseqAdam",
                                   "lr_scheduler_state": {"best": 3.9}, "num_updates": 300000}],
            "last_optimizer_state": None}


def build_archive(tmp_path, layout: Layout):
    """Train a tiny model on the Moses + BPE data of ``layout`` and save it as the published archive."""
    import torch

    from fairseq_kd.checkpoints import load_checkpoint_state
    from fairseq_kd.prepare_bpe import prepare_bpe

    first = tmp_path / "first"
    bin_dir = prepare_bpe(layout.corpus, DATA, layout.src, layout.tgt, str(first), train_lines=300, valid_lines=30,
                          test_lines=30, merges=400, test_from_valid=layout.test_from_valid or None,
                          aggressive=layout.aggressive)
    cli.train(bin_dir, first / "teacher", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
              "--max-update", "2")
    state = load_checkpoint_state(str(first / "teacher" / "checkpoint_best.pt"))
    archive = tmp_path / layout.name
    archive.mkdir()
    names = ["model.pt"] if layout.models == 1 else [f"model{i}.pt" for i in range(1, layout.models + 1)]
    for i, name in enumerate(names):
        torch.save(old_format(state, i), archive / name)
    for lang in (layout.src, layout.tgt):
        shutil.copyfile(first / "bin" / f"dict.{lang}.txt", archive / f"dict.{lang}.txt")
    merges = [m for m in read(first / "bpecodes") if not m.startswith("#version")]
    if layout.codes == "fastbpe":  # fastBPE's learnbpe output: "a b count", no header
        (archive / "bpecodes").write_text("".join(f"{m} {1000 - i}\n" for i, m in enumerate(merges)), encoding="utf-8")
    else:
        shutil.copyfile(first / "bpecodes", archive / "bpecodes")
    shutil.rmtree(first)  # the teacher's own data are gone, as with a download
    return archive, merges


def test_fake_archives_have_the_published_format(tmp_path):
    """The fake old-format checkpoint loads through the safe loader as fairseq upgrades it (args -> cfg)."""
    import torch

    from fairseq_kd.checkpoints import load_checkpoint_state
    from fairseq_kd.prepare_bpe import read_codes

    archive, merges = build_archive(tmp_path, LAYOUTS["wmt19.en-de"])
    assert sorted(os.listdir(archive)) == ["bpecodes", "dict.de.txt", "dict.en.txt", "model1.pt", "model2.pt",
                                           "model3.pt", "model4.pt"]
    raw = torch.load(archive / "model1.pt", weights_only=True)
    assert "cfg" not in raw and isinstance(raw["args"], argparse.Namespace)
    assert all(v.dtype == torch.float16 for v in raw["model"].values() if v.is_floating_point())
    state = load_checkpoint_state(str(archive / "model2.pt"))
    assert state["cfg"].model.arch == "transformer_vaswani_wmt_en_de_big"
    assert read_codes(str(archive / "bpecodes")) == ("fastbpe", merges)


@pytest.mark.parametrize("key", ["wmt14.en-fr", "wmt16.en-de", "wmt19.en-de", "wmt19.en-de.single", "wmt19.de-en"])
@pytest.mark.e2e
def test_published_teacher_layout_through_the_recipe(tmp_path, key):
    layout = LAYOUTS[key]
    archive, merges = build_archive(tmp_path, layout)
    work = tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1", TRAIN_LINES="300", VALID_LINES="30", TEST_LINES="30",
               STUDENT_UPDATES="2", TEST_BEAM="1")
    if layout.test_from_valid:
        env["TEST_FROM_VALID"] = str(layout.test_from_valid)
    proc = run_recipe(WMT_RUN, ["--pair", f"{layout.src}-{layout.tgt}", "--scale", "cpu", "--students", "word_kd",
                                "--work", work, "--teacher-dir", archive], env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert started(proc.stdout) == ["prepare", "translate_teacher", "student_word_kd", "translate_student_word_kd",
                                    "score"]
    data = work / "data"
    for lang in (layout.src, layout.tgt):
        assert read(data / "bin" / f"dict.{lang}.txt") == read(archive / f"dict.{lang}.txt")
    assert [m for m in read(data / "bpecodes") if not m.startswith("#version")] == merges  # the teacher's own BPE
    tok = "\n".join(read(data / "tok" / f"train.{layout.tgt}"))
    assert ("@-@" in tok) == layout.aggressive  # the teacher's tokenization
    assert any("@@ " in line for line in read(data / "bpe_text" / f"train.{layout.tgt}"))
    teacher_log = (work / "student_word_kd.train.log").read_text()
    ckpts = ":".join(str(archive / n) for n in sorted(os.listdir(archive)) if n.endswith(".pt"))
    assert "done training" in teacher_log and ckpts in teacher_log
    assert len(read(work / "teacher.test.hyp")) == 30 and len(read(work / "student_word_kd.test.hyp")) == 30


def test_bad_codes_file_is_a_one_line_error(tmp_path):
    from fairseq_kd.errors import DistillationError
    from fairseq_kd.prepare_bpe import read_codes

    bad = tmp_path / "bpecodes"
    bad.write_text("a b\nc d e f\n")
    with pytest.raises(DistillationError, match=r"line 2 is neither 'a b' \(subword-nmt\) nor 'a b count'"):
        read_codes(str(bad))
