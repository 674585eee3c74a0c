"""Nothing stale, nothing trusted blindly: the teacher cache's files and values are checked, the cache and
a live teacher are matched by what the teacher saw, and line counts count a last unterminated line."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from fairseq_kd.cache import integrity
from fairseq_kd.cache.dataset import TeacherCache
from fairseq_kd.errors import DistillationError
from tests import cli

KD = ["--user-dir", cli.USER_DIR, "--task", "distillation_translation"]
SPLIT = "valid"  # 60 examples: small caches, quick builds


def build(prepared, teacher, out_dir, *extra, check=True):
    return cli.run("fairseq_kd.cache", ["build", "--data", prepared.bin, "--path", teacher, "--out-dir", out_dir,
                                        "--split", SPLIT, "--k", "4", "--cpu", "--no-progress-bar", *extra],
                   check=check)


@pytest.fixture(scope="module")
def cache(prepared, teacher_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("integrity") / "cache")
    build(prepared, teacher_ckpt, out, "--num-shards", "2")
    return out


@pytest.fixture
def copy(cache, tmp_path):
    out = str(tmp_path / "cache")
    shutil.copytree(cache, out)
    return out


def _one_line(exc_info, *needles):
    message = str(exc_info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def _first_value_below(path: str, below: float) -> int:
    values = np.fromfile(path, dtype=np.float16)
    return int(np.flatnonzero(values < below)[0])


def _poke(path: str, index: int, value) -> None:
    values = np.fromfile(path, dtype=np.float16)
    values[index] = value
    values.tofile(path)


def _rerecord(cache_dir: str) -> None:
    """Record the shards' current files as if the change sat in a block the fast check does not sample."""
    manifest_path = os.path.join(cache_dir, "manifest.json")
    manifest = json.load(open(manifest_path))
    for name in manifest["shards"]:
        manifest["shards"][name] = integrity.shard_record(os.path.join(cache_dir, name))
    json.dump(manifest, open(manifest_path, "w"))


# -- the files --------------------------------------------------------------------------


def test_manifest_records_every_shard_file(cache):
    manifest = json.load(open(os.path.join(cache, "manifest.json")))
    assert manifest["format"] == 3 and sorted(manifest["shards"]) == ["shard000-of-002", "shard001-of-002"]
    for name, record in manifest["shards"].items():
        assert sorted(record) == sorted(integrity.FILES)
        for file, entry in record.items():
            path = os.path.join(cache, name, file)
            assert entry["size"] == os.path.getsize(path)
            assert entry["sha256"] == integrity.full_digest(path)
    assert len(TeacherCache(cache, full=True)) == 60


def test_a_flipped_sign_is_refused_at_open_and_where_it_is_read(copy):
    path = os.path.join(copy, "shard001-of-002", "lprobs.bin")
    i = _first_value_below(path, -2.0)
    values = np.fromfile(path, dtype=np.float16)
    _poke(path, i, -values[i])  # -2.70 -> +2.70: a "probability" of 14.8
    with pytest.raises(DistillationError) as e:
        TeacherCache(copy)
    _one_line(e, copy, path, "differs from its recorded sha256", "move", "fairseq-kd-build-cache build")
    _rerecord(copy)  # a flip the sampled digests miss: the value's range check names the example
    cache = TeacherCache(copy)
    example = int(cache.starts[1]) + int(np.searchsorted(np.cumsum(cache.shards[1][1].sizes), i, side="right"))
    for j in range(len(cache)):
        if j != example:
            cache[j]
    with pytest.raises(DistillationError) as e:
        cache[example]
    _one_line(e, copy, "shard001-of-002", f"example {example}", "log-probability +", "must be finite and <= 0")


@pytest.mark.parametrize("value, needle", [(float("nan"), "log-probability +nan"),
                                           (float("inf"), "log-probability +inf")])
def test_nan_and_inf_in_the_cache_name_the_example(copy, value, needle):
    path = os.path.join(copy, "shard000-of-002", "lprobs.bin")
    _poke(path, 5, value)
    _rerecord(copy)
    cache = TeacherCache(copy)
    with pytest.raises(DistillationError) as e:
        for j in range(len(cache)):
            cache[j]
    _one_line(e, "shard000-of-002", "example 0", needle)


def test_unsorted_top_k_and_a_mass_that_is_not_one_are_refused(copy):
    path = os.path.join(copy, "shard000-of-002", "lprobs.bin")
    values = np.fromfile(path, dtype=np.float16)
    values[[0, 1]] = values[[1, 0]]  # example 0, position 0: the two best swapped
    values.tofile(path)
    _rerecord(copy)
    with pytest.raises(DistillationError) as e:
        TeacherCache(copy)[0]
    _one_line(e, "example 0, position 0", "not sorted")
    values[[0, 1]] = values[[1, 0]]
    values[4:8] -= 1.5  # position 1's top-k lowered, still sorted: its probabilities no longer sum to 1
    values.tofile(path)
    _rerecord(copy)
    with pytest.raises(DistillationError) as e:
        TeacherCache(copy)[0]
    _one_line(e, "example 0, position 1", "sum to")


def test_a_data_file_cut_to_half_is_refused_at_open(copy):
    path = os.path.join(copy, "shard000-of-002", "lprobs.bin")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DistillationError) as e:
        TeacherCache(copy)
    _one_line(e, path, "bytes, the manifest records")
    _rerecord(copy)  # the manifest agrees with the cut file: the index does not
    with pytest.raises(DistillationError) as e:
        TeacherCache(copy)
    _one_line(e, path, "its index", "lprobs.idx describes")


def test_full_verification_reads_what_the_sampled_check_skips(copy, monkeypatch):
    path = os.path.join(copy, "shard000-of-002", "ids.bin")
    monkeypatch.setattr(integrity, "SAMPLE_BLOCKS", 2)
    monkeypatch.setattr(integrity, "BLOCK", 16)  # first and last 16 bytes sampled
    _rerecord(copy)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 1  # an id in the middle: another valid token
    open(path, "wb").write(bytes(data))
    TeacherCache(copy)  # sizes and samples agree
    with pytest.raises(DistillationError) as e:
        TeacherCache(copy, full=True)
    _one_line(e, path, "differs from its recorded sha256")
    proc = cli.run("fairseq_kd.cache", ["verify", "--full", copy], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if "error:" in line][0].count(path) == 1


def test_an_older_format_is_refused_naming_the_rebuild(copy):
    manifest_path = os.path.join(copy, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["format"] = 2
    for key in ("shards", "fingerprint", "teacher_langs"):
        del manifest[key]
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(DistillationError) as e:
        TeacherCache(copy)
    _one_line(e, manifest_path, "format 2", "reads format 3", "fairseq-kd-build-cache build --out-dir")


def test_a_damaged_value_stops_fairseq_train_in_one_line_with_a_loader_worker(prepared, copy, tmp_path):
    path = os.path.join(copy, "shard001-of-002", "lprobs.bin")
    _poke(path, _first_value_below(path, -2.0), float("nan"))
    _rerecord(copy)
    proc = cli.train(prepared.bin, str(tmp_path / "s"), *KD, "--teacher-cache", copy, "--criterion", "word_kd",
                     "--train-subset", SPLIT, "--max-update", "6", "--num-workers", "1", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "shard001-of-002" in errors[0] and "log-probability +nan" in errors[0], errors


# -- what the teacher saw ---------------------------------------------------------------


def _task(data, cache, **extra):
    from fairseq_kd.tasks.distillation_translation import DistillationTranslationConfig, DistillationTranslationTask

    cfg = DistillationTranslationConfig(data=data, source_lang="en", target_lang="de", teacher_cache=cache,
                                        train_subset=SPLIT, **extra)
    task = DistillationTranslationTask.setup_task(cfg)
    task.cfg.dataset_impl, task.cfg.required_seq_len_multiple = None, 1
    return task


def _load(data, cache, **extra):
    task = _task(data, cache, **extra)
    task.load_dataset(SPLIT)
    return task.dataset(SPLIT)


def _rewrite_split(data: str, change) -> None:
    """Rewrite the binarized SPLIT of ``data`` with ``change(sources, targets)`` applied (lists of tensors)."""
    from fairseq.data import data_utils, indexed_dataset

    prefixes = [os.path.join(data, f"{SPLIT}.en-de.{lang}") for lang in ("en", "de")]
    sides = [[t.clone() for t in data_utils.load_indexed_dataset(p, None)] for p in prefixes]
    change(*sides)
    vocab = len(open(os.path.join(data, "dict.en.txt")).read().splitlines()) + 4
    for prefix, items in zip(prefixes, sides):
        builder = indexed_dataset.make_builder(prefix + ".bin", impl="mmap", vocab_size=vocab)
        for t in items:
            builder.add_item(t)
        builder.finalize(prefix + ".idx")


def test_the_cache_loads_for_its_own_split(prepared, cache):
    assert len(_load(prepared.bin, cache)) == 60


def test_swapped_examples_with_equal_target_lengths_are_refused(prepared, cache, tmp_path):
    data = str(tmp_path / "bin")
    shutil.copytree(prepared.bin, data)

    def swap(src, tgt):
        lengths = [t.numel() for t in tgt]
        i = next(i for i in range(len(tgt)) if lengths.index(lengths[i]) != i)
        j = lengths.index(lengths[i])
        src[i], src[j], tgt[i], tgt[j] = src[j], src[i], tgt[j], tgt[i]

    _rewrite_split(data, swap)
    with pytest.raises(DistillationError) as e:
        _load(data, cache)
    _one_line(e, cache, "other source sentences (or another order)", f"--data {data} --split {SPLIT}")


def test_other_target_sentences_of_equal_lengths_are_refused(prepared, cache, tmp_path):
    data = str(tmp_path / "bin")
    shutil.copytree(prepared.bin, data)

    def other_words(src, tgt):
        tgt[3][:-1] = torch.flip(tgt[3][:-1], [0]) if tgt[3].numel() > 2 else tgt[3][:-1] + 1

    _rewrite_split(data, other_words)
    with pytest.raises(DistillationError) as e:
        _load(data, cache)
    _one_line(e, cache, "other target sentences")


def test_a_truncate_source_change_is_refused_and_a_matching_cache_accepted(prepared, teacher_ckpt, cache, tmp_path):
    with pytest.raises(DistillationError) as e:
        _load(prepared.bin, cache, truncate_source=True, max_source_positions=8)
    _one_line(e, cache, "its teacher saw full sources (no --truncate-source)",
              "this run feeds --truncate-source --max-source-positions 8")
    cut = str(tmp_path / "cut")
    build(prepared, teacher_ckpt, cut, "--truncate-source", "--max-source-positions", "8")
    assert len(_load(prepared.bin, cut, truncate_source=True, max_source_positions=8)) == 60
    with pytest.raises(DistillationError, match="this run feeds full sources"):
        _load(prepared.bin, cut)
    # the cut cache really holds what the teacher says on cut sources: it differs from the full one
    full, short = TeacherCache(cache), TeacherCache(cut)
    sources = _load(prepared.bin, cache).dataset.src
    long_example = max(range(60), key=lambda i: len(sources[i]))
    assert not torch.equal(full[long_example][1], short[long_example][1])


def _reversed_teacher(teacher_ckpt, tmp_path) -> str:
    from fairseq_kd.checkpoints import install_safe_globals

    install_safe_globals()
    state = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    state["cfg"]["task"]["source_lang"], state["cfg"]["task"]["target_lang"] = "de", "en"
    path = str(tmp_path / "de_en.pt")
    torch.save(state, path)
    return path


def test_a_teacher_of_the_other_direction_is_refused(prepared, teacher_ckpt, cache, tmp_path):
    de_en = _reversed_teacher(teacher_ckpt, tmp_path)
    # the joined dictionary is the same file for both languages: only the recorded languages tell
    dicts = [open(os.path.join(prepared.bin, f"dict.{lang}.txt")).read() for lang in ("en", "de")]
    assert dicts[0] == dicts[1]
    proc = build(prepared, de_en, str(tmp_path / "c"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "was trained de->en" in proc.stderr and "translates en->de" in proc.stderr
    # a cache recording a de->en teacher
    copy = str(tmp_path / "copy")
    shutil.copytree(cache, copy)
    manifest_path = os.path.join(copy, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["teacher_langs"] = [["de", "en"]]
    json.dump(manifest, open(manifest_path, "w"))
    with pytest.raises(DistillationError) as e:
        _load(prepared.bin, copy)
    _one_line(e, copy, "was trained de->en", "translates en->de")
    # a live teacher
    task = _task(prepared.bin, None, teacher_path=de_en)
    with pytest.raises(DistillationError) as e:
        task.load_teacher()
    _one_line(e, "--teacher-path", de_en, "was trained de->en")
    task = _task(prepared.bin, None, teacher_path=teacher_ckpt)
    assert len(task.load_teacher()) == 1


def _short_teacher(teacher_ckpt, tmp_path, **positions) -> str:
    """The teacher with its positional embeddings limited (sinusoidal ones: only the recorded limit changes)."""
    from fairseq_kd.checkpoints import install_safe_globals

    install_safe_globals()
    state = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    model = state["cfg"]["model"]
    for key, value in positions.items():
        if isinstance(model, dict):
            model[key] = value
        else:
            setattr(model, key, value)
    path = str(tmp_path / ("short_" + "_".join(f"{k}{v}" for k, v in positions.items()) + ".pt"))
    torch.save(state, path)
    return path


def test_examples_longer_than_the_teachers_positions_are_refused_by_the_build_and_skipped_in_training(
        prepared, teacher_ckpt, tmp_path):
    short_src = _short_teacher(teacher_ckpt, tmp_path, max_source_positions=8)
    out = str(tmp_path / "c")
    proc = build(prepared, short_src, out, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    for needle in (f"split {SPLIT} of {prepared.bin}", "more source tokens than the teacher's 8 positions",
                   "pass --truncate-source --max-source-positions 8"):
        assert needle in errors[0], errors[0]
    assert not os.path.exists(out)  # nothing written
    # the fix it names works: the sources cut to the teacher's reach
    build(prepared, short_src, out, "--truncate-source", "--max-source-positions", "8")
    assert len(_load(prepared.bin, out, truncate_source=True, max_source_positions=8)) == 60
    # targets cannot be cut: the long pairs are to be removed
    short_tgt = _short_teacher(teacher_ckpt, tmp_path, max_target_positions=8)
    proc = build(prepared, short_tgt, str(tmp_path / "t"), check=False)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "more target tokens than the teacher's 8 positions" in errors[0] and "remove the long pairs" in errors[0]
    # a live teacher: the task's limits include the teacher's, so fairseq skips (or refuses) the long pairs
    task = _task(prepared.bin, None, teacher_path=_short_teacher(teacher_ckpt, tmp_path, max_source_positions=24))
    assert task.max_positions() == (1024, 1024)
    task.load_teacher()
    assert task.max_positions() == (24, 1024)
    task.load_dataset(SPLIT)
    dataset = task.dataset(SPLIT)
    batches = task.get_batch_iterator(dataset, max_tokens=4096, max_positions=task.max_positions(),
                                      ignore_invalid_inputs=True).next_epoch_itr(shuffle=False)
    seen = sorted(i for batch in batches for i in batch["id"].tolist())
    expected = [i for i in range(len(dataset)) if dataset.src_sizes[i] <= 24]
    assert seen == expected and 0 < len(expected) < len(dataset)


def test_a_cache_given_to_a_criterion_without_a_teacher_is_refused(prepared, cache, tmp_path):
    proc = cli.train(prepared.bin, str(tmp_path / "s"), *KD, "--teacher-cache", cache, "--train-subset", SPLIT,
                     "--criterion", "label_smoothed_cross_entropy", "--max-update", "2", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"--teacher-cache {cache} is not read" in errors[0], errors


# -- line counts ------------------------------------------------------------------------

STAGES = os.path.join(cli.REPO, "scripts", "lib", "stages.sh")


def _bash(script: str, *args: str):
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source {STAGES}; {script}", "bash", *args],
                          capture_output=True, text=True)


def test_a_last_line_without_a_newline_is_counted(tmp_path):
    from fairseq_kd.textio import count_lines

    ref, src, short = tmp_path / "ref.de", tmp_path / "src.en", tmp_path / "short.de"
    ref.write_text("".join(f"Satz {i}\n" for i in range(11)) + "Satz 11")  # 12 lines, wc -l says 11
    src.write_text("".join(f"sentence {i}\n" for i in range(12)))
    short.write_text("".join(f"Satz {i}\n" for i in range(11)))
    assert count_lines(str(ref)) == count_lines(str(src)) == 12
    proc = _bash('assert_lines "$1" "$(count_lines "$2")"; lines "$1"; count_lines "$2"', str(ref), str(src))
    assert proc.returncode == 0 and proc.stdout.split() == ["12", "12"], proc.stderr
    proc = _bash('assert_lines "$1" "$(count_lines "$2")"', str(short), str(src))
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{short} has 11 lines, expected 12" in proc.stderr and "delete" not in proc.stderr
    assert open(short).read().count("\n") == 11  # the user's file is left as it was


# -- steps that skip an existing output -------------------------------------------------


def _corpus(root, lines):
    folder = root / "toy_en_de"
    folder.mkdir(parents=True, exist_ok=True)
    words = ["house", "garden", "tree", "river", "street", "window", "door", "table", "chair", "light"]
    worte = ["Haus", "Garten", "Baum", "Fluss", "Strasse", "Fenster", "Tuer", "Tisch", "Stuhl", "Licht"]
    for split, n in (("train", lines), ("valid", 6), ("test", 5)):
        pick = [(i * 7 + j) % len(words) for i in range(n) for j in range(3)]
        src = [" ".join(["the"] + [words[k] for k in pick[3 * i:3 * i + 3]]) for i in range(n)]
        tgt = [" ".join(["das"] + [worte[k] for k in pick[3 * i:3 * i + 3]]) for i in range(n)]
        (folder / f"{split}.en").write_text("".join(s + f" {i}\n" for i, s in enumerate(src)), encoding="utf-8")
        (folder / f"{split}.de").write_text("".join(t + f" {i}\n" for i, t in enumerate(tgt)), encoding="utf-8")
    return folder


def test_prepare_bpe_redoes_a_step_whose_inputs_or_settings_changed(tmp_path):
    from fairseq_kd.prepare_bpe import prepare_bpe

    folder, out = _corpus(tmp_path / "data", 40), tmp_path / "out"
    lines = lambda p: p.read_text(encoding="utf-8").splitlines()  # noqa: E731
    prepare_bpe("toy_en_de", str(tmp_path / "data"), "en", "de", str(out), train_lines=30, merges=40)
    assert len(lines(out / "sliced" / "train.en")) == 30 and len(lines(out / "tok" / "train.de")) == 30
    codes, first = len(lines(out / "bpecodes")), (out / "bin" / "train.en-de.en.bin").read_bytes()
    kept = len(lines(out / "raw" / "train.en"))
    prepare_bpe("toy_en_de", str(tmp_path / "data"), "en", "de", str(out), train_lines=20, merges=25)
    assert len(lines(out / "sliced" / "train.en")) == len(lines(out / "bpe" / "train.de")) == 20
    assert len(lines(out / "raw" / "train.en")) == len(lines(out / "bpe_text" / "train.de")) < kept
    assert len(lines(out / "bpecodes")) == 26 < codes  # a header and 25 merges
    assert (out / "bin" / "train.en-de.en.bin").read_bytes() != first
    # the corpus edited in place, same size: the content is fingerprinted, not the size
    text = (folder / "train.en").read_text(encoding="utf-8")
    (folder / "train.en").write_text(text.replace("the house", "the horse", 1), encoding="utf-8")
    assert len(text) == len((folder / "train.en").read_text(encoding="utf-8"))
    prepare_bpe("toy_en_de", str(tmp_path / "data"), "en", "de", str(out), train_lines=20, merges=25)
    assert "horse" in (out / "raw" / "train.en").read_text(encoding="utf-8")
    assert "horse" in (out / "tok" / "train.en").read_text(encoding="utf-8")


def test_wmt_training_text_and_extraction_follow_their_inputs(tmp_path):
    import tarfile

    from fairseq_kd.wmt.archives import Archive, Bitext, Pair, TestSet
    from fairseq_kd.wmt.clean import build_train
    from fairseq_kd.wmt.extract import extract_members

    def archive(path, words):
        src = tmp_path / "a.en"
        src.write_text("".join(f"{w} one two\n" for w in words) + "short\n", encoding="utf-8")
        (tmp_path / "a.de").write_text("".join(f"{w} eins zwei\n" for w in words) + "kurz und lang und mehr\n",
                                       encoding="utf-8")
        with tarfile.open(path, "w:gz") as t:
            for lang in ("en", "de"):
                t.add(tmp_path / f"a.{lang}", arcname=f"corpus/a.{lang}")

    tgz, folder, out = tmp_path / "a.tgz", str(tmp_path / "a.tgz.d"), str(tmp_path / "out")
    archive(tgz, ["alpha", "beta"])
    extract_members(str(tgz), ["a.en", "a.de"], folder, archive_sha256="1" * 64)
    archive(tgz, ["gamma", "delta", "epsilon"])  # another copy of the archive: its members extracted again
    extract_members(str(tgz), ["a.en", "a.de"], folder, archive_sha256="2" * 64)
    assert open(os.path.join(folder, "a.en")).read().startswith("gamma")
    os.makedirs(out)
    test = TestSet(sacrebleu="wmt14", label="toy", lines=1)
    pair = Pair(corpus="toy", src="en", tgt="de", archives=(Archive("a.tgz", "file://a.tgz"),),
                bitexts=(Bitext(archive="a.tgz", prefix="a"),), valid=test, test=test)
    build_train(pair, {"a.tgz": folder}, out)
    assert len(open(os.path.join(out, "train.en")).read().splitlines()) == 4
    build_train(pair, {"a.tgz": folder}, out, max_words=3, max_ratio=1.5)  # the extra cleaning drops a pair
    assert len(open(os.path.join(out, "train.en")).read().splitlines()) == 3


def test_a_cache_build_on_changed_data_is_refused_not_skipped(prepared, teacher_ckpt, cache, tmp_path):
    from fairseq_kd.cache.build import build_cache

    data = str(tmp_path / "bin")
    shutil.copytree(prepared.bin, data)
    _rewrite_split(data, lambda src, tgt: src.reverse())
    with pytest.raises(DistillationError) as e:
        build_cache(data, SPLIT, teacher_ckpt, cache, k=4, num_shards=2)
    _one_line(e, os.path.join(cache, "manifest.json"), "the split's content or the options the teacher saw differ",
              "new --out-dir")
