"""A preparation step redoes when its inputs or settings changed, and skips only what it really made."""

import gzip
import os

import pytest

from fairseq_kd import textio
from fairseq_kd.prepare import prepare
from fairseq_kd.stamps import Stamps
from tests import cli


def corpus(root, n=500):
    """``root/toy``: the first ``n`` Multi30k pairs as plain files (train) and 30 pairs for valid and test."""
    folder = root / "toy"
    folder.mkdir()
    for lang in ("en", "de"):
        with gzip.open(os.path.join(cli.SHARED_DATA, "multi30k_en_de", f"train.{lang}.gz"), "rt", encoding="utf-8") as f:
            lines = [next(f).rstrip("\n") for _ in range(n + 60)]
        (folder / f"train.{lang}").write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
        (folder / f"valid.{lang}").write_text("\n".join(lines[n:n + 30]) + "\n", encoding="utf-8")
        (folder / f"test.{lang}").write_text("\n".join(lines[n + 30:]) + "\n", encoding="utf-8")
    return folder


def train_sentences(bin_dir):
    """The number of sentences in the binarized training split (from fairseq-preprocess's index)."""
    from fairseq.data import data_utils

    dataset = data_utils.load_indexed_dataset(os.path.join(bin_dir, "train.en-de.de"), None)
    return len(dataset)


def vocab_lines(out):
    return textio.count_lines(str(out / "spm.vocab"))


def test_changed_settings_redo_every_step_and_the_data_changes(tmp_path):
    corpus(tmp_path)
    out = tmp_path / "out"
    bin_dir = prepare("toy", str(tmp_path), "en", "de", str(out), train_lines=400, vocab_size=300)
    assert textio.count_lines(str(out / "raw" / "train.en")) == 400 and vocab_lines(out) == 300
    assert train_sentences(bin_dir) == 400
    # a second run with the same settings skips every step: nothing is rewritten
    before = {p: os.stat(out / p).st_mtime_ns for p in ("raw/train.en", "spm.model", "spm_text/train.de", "bin/dict.de.txt")}
    prepare("toy", str(tmp_path), "en", "de", str(out), train_lines=400, vocab_size=300)
    assert {p: os.stat(out / p).st_mtime_ns for p in before} == before
    # fewer lines and a smaller vocabulary: the data really follow the new settings
    bin_dir = prepare("toy", str(tmp_path), "en", "de", str(out), train_lines=200, vocab_size=250)
    assert textio.count_lines(str(out / "raw" / "train.en")) == 200
    assert textio.count_lines(str(out / "spm_text" / "train.de")) == 200
    assert vocab_lines(out) == 250
    assert train_sentences(bin_dir) == 200
    # only the vocabulary changed: the slice is kept, the steps after the SentencePiece model are redone
    raw_mtime = os.stat(out / "raw" / "train.en").st_mtime_ns
    old_dict = (out / "bin" / "dict.de.txt").read_text(encoding="utf-8")
    prepare("toy", str(tmp_path), "en", "de", str(out), train_lines=200, vocab_size=280)
    assert os.stat(out / "raw" / "train.en").st_mtime_ns == raw_mtime
    assert vocab_lines(out) == 280
    assert (out / "bin" / "dict.de.txt").read_text(encoding="utf-8") != old_dict


def test_a_corpus_edited_in_place_with_the_same_size_is_redone(tmp_path):
    folder = corpus(tmp_path, n=300)
    out = tmp_path / "out"
    prepare("toy", str(tmp_path), "en", "de", str(out), vocab_size=250)
    path = folder / "train.de"
    data = path.read_bytes()
    first = data.split(b"\n", 1)[0]
    edited = first.decode("utf-8")[::-1].encode("utf-8")  # the line reversed: same size, other content
    assert edited != first
    path.write_bytes(edited + data[len(first):])
    assert path.stat().st_size == len(data)
    prepare("toy", str(tmp_path), "en", "de", str(out), vocab_size=250)
    assert open(out / "raw" / "train.de", "rb").read().split(b"\n", 1)[0] == edited


def test_outputs_without_a_stamp_are_not_trusted(tmp_path):
    """Outputs left by an interrupted run (or an older version) that carry no stamp are made again."""
    corpus(tmp_path, n=300)
    out = tmp_path / "out"
    (out / "raw").mkdir(parents=True)
    for lang in ("en", "de"):  # a stale slice of the wrong size, with no stamp
        (out / "raw" / f"train.{lang}").write_text("stale\n" * 7, encoding="utf-8")
    prepare("toy", str(tmp_path), "en", "de", str(out), vocab_size=250)
    assert textio.count_lines(str(out / "raw" / "train.en")) == 300


def test_digests_are_cached_by_size_and_mtime(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("a\n" * 1000, encoding="utf-8")
    stamps = Stamps(str(tmp_path / "out"))
    first = stamps.file_digest(str(path))
    # a fresh reader finds the cached digest (the cache is on disk), and a content change is seen
    assert Stamps(str(tmp_path / "out")).file_digest(str(path)) == first
    path.write_text("b\n" * 1000, encoding="utf-8")
    assert Stamps(str(tmp_path / "out")).file_digest(str(path)) != first
    assert stamps.make("x", {"n": 1}, [str(path)]) != stamps.make("x", {"n": 2}, [str(path)])


@pytest.mark.parametrize("missing", ["spm.model", "bin"])
def test_a_removed_output_is_made_again(tmp_path, missing):
    import shutil

    corpus(tmp_path, n=300)
    out = tmp_path / "out"
    prepare("toy", str(tmp_path), "en", "de", str(out), vocab_size=250)
    target = out / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    bin_dir = prepare("toy", str(tmp_path), "en", "de", str(out), vocab_size=250)
    assert target.exists() and train_sentences(bin_dir) == 300


def test_unlabeled_links_to_another_data_folder_are_replaced(tmp_path):
    from fairseq_kd.unlabeled import link_data_dir

    old, new, dest = tmp_path / "old", tmp_path / "new", tmp_path / "dest"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "dict.en.txt").write_text(text + " 1\n", encoding="utf-8")
    link_data_dir(str(old), str(dest))
    (dest / "own.txt").write_text("mine\n", encoding="utf-8")
    assert link_data_dir(str(new), str(dest)) == 1
    assert (dest / "dict.en.txt").read_text(encoding="utf-8") == "new 1\n"
    assert (dest / "own.txt").read_text(encoding="utf-8") == "mine\n"
