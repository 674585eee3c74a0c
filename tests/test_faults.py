"""Faults a user meets on a real run: each gives one clear line (exit != 0, no traceback) or correct behaviour.

Grouped as in docs/reliability.md: flags, data parallelism, non-finite values, bad checkpoints and
teachers, the unsafe-load override, bad text, concurrent and killed decoding, KD state on resume (SIGKILL
mid-epoch, resumed run == uninterrupted run for every criterion), and 2-rank vs 1-rank ``--update-freq 2``
parity.  Tiny models (tests/cli.py TINY_ARCH), a few updates, the real Multi30k slice of tests/conftest.py.
"""

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from unittest import mock

import pytest
import torch

from fairseq_kd import checkpoints, decoding, scoring, textio
from fairseq_kd.criterions.hybrid_gated_kd import HybridGatedKDConfig, HybridGatedKDCriterion
from fairseq_kd.criterions.tie_kd import TieKDConfig, TieKDCriterion
from fairseq_kd.criterions.word_kd import WordKDConfig, WordKDCriterion
from fairseq_kd.decoding.shards import partial_shards, shard_lock
from fairseq_kd.errors import DistillationError
from fairseq_kd.teacher import TeacherEnsemble, load_teacher
from tests import cli, toy

KD = ["--user-dir", cli.USER_DIR, "--task", "distillation_translation"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=cli.REPO)


def one_line_error(proc, *needles):
    """``proc`` failed with a fairseq-kd error line holding every needle, and no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if "error:" in line]
    assert lines, out[-2000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def real_task(data, **overrides):
    from fairseq_kd.tasks.distillation_translation import DistillationTranslationConfig, DistillationTranslationTask

    cfg = DistillationTranslationConfig(data=data, source_lang="en", target_lang="de", **overrides)
    return DistillationTranslationTask.setup_task(cfg)


def train_step(task, criterion, model, sample, update_num=0):
    optimizer = types.SimpleNamespace(backward=lambda loss: loss.backward())
    return task.train_step(sample, model, criterion, optimizer, update_num)


# ---- flags ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.inf, math.nan, -1.0])
def test_kd_temperature_must_be_finite_and_positive(value):
    with pytest.raises(DistillationError, match="--kd-temperature must be a finite number > 0"):
        WordKDCriterion(toy.make_task(), WordKDConfig(kd_temperature=value, sentence_avg=False))


@pytest.mark.parametrize("value", [1.5, 1.0, -0.1, math.nan])
def test_label_smoothing_must_be_in_0_1(value):
    with pytest.raises(DistillationError, match=r"--label-smoothing must be in \[0, 1\)"):
        WordKDCriterion(toy.make_task(), WordKDConfig(label_smoothing=value, sentence_avg=False))


def test_cli_kd_temperature_inf_is_one_line(prepared, teacher_ckpt, tmp_path):
    proc = cli.train(prepared.bin, str(tmp_path), *KD, "--teacher-path", teacher_ckpt, "--criterion", "word_kd",
                     "--kd-temperature", "inf", "--max-update", "1", check=False)
    one_line_error(proc, "--kd-temperature", "inf")


# ---- data parallelism ----------------------------------------------------------------------------------


def torch_ddp_wrapped(model):
    """What fairseq's trainer hands to train_step under --ddp-backend pytorch_ddp: a proxy whose module is DDP."""
    ddp = mock.Mock(spec=torch.nn.parallel.DistributedDataParallel)
    ddp.module = model
    return types.SimpleNamespace(module=ddp, train=model.train, set_num_updates=model.set_num_updates)


@pytest.mark.parametrize("criterion_cls, cfg", [
    (HybridGatedKDCriterion, HybridGatedKDConfig(sentence_avg=False)),
    (TieKDCriterion, TieKDConfig(sentence_avg=False)),
])
def test_criterions_calling_model_parts_refuse_torch_ddp_before_any_step(criterion_cls, cfg):
    task = toy.make_task()
    model, sample = toy.make_model(task), toy.make_sample(task)
    task.teacher = toy.make_teacher(task)
    criterion = criterion_cls(task, cfg)
    with pytest.raises(DistillationError, match="--ddp-backend legacy_ddp"):
        train_step(task, criterion, torch_ddp_wrapped(model), sample)
    assert all(p.grad is None for p in model.parameters())  # refused before the forward


class FullyShardedDataParallel(torch.nn.Module):
    """Stands for fairseq's wrapper of ``--ddp-backend fully_sharded`` (fairscale's FSDP, not installed
    here): like torch's DDP it syncs gradients only through its own forward."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("criterion_cls, cfg", [
    (HybridGatedKDCriterion, HybridGatedKDConfig(sentence_avg=False)),
    (TieKDCriterion, TieKDConfig(sentence_avg=False)),
])
def test_criterions_calling_model_parts_refuse_fully_sharded_before_any_step(criterion_cls, cfg):
    task = toy.make_task()
    model, sample = toy.make_model(task), toy.make_sample(task)
    task.teacher = toy.make_teacher(task)
    criterion = criterion_cls(task, cfg)
    wrapped = types.SimpleNamespace(module=FullyShardedDataParallel(model), train=model.train,
                                    set_num_updates=model.set_num_updates)
    with pytest.raises(DistillationError, match=r"FullyShardedDataParallel \(--ddp-backend fully_sharded\).*legacy_ddp"):
        train_step(task, criterion, wrapped, sample)
    assert all(p.grad is None for p in model.parameters())  # refused before the forward


def run_two_ranks(data, save_dir, flags, backend):
    port = cli.free_port()
    procs = []
    for rank in range(2):
        cmd = [sys.executable, "-m", "fairseq_cli.train", data, "--save-dir", save_dir, *cli.TINY_ARCH,
               *cli.TINY_OPTIM, *flags, "--distributed-backend", "gloo", "--ddp-backend", backend,
               "--distributed-world-size", "2", "--distributed-rank", str(rank), "--distributed-no-spawn",
               "--distributed-init-method", f"tcp://127.0.0.1:{port}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=cli.REPO, env=ENV))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


DDP_RANK = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {repo!r})
from fairseq.distributed import ModuleProxyWrapper
from fairseq_kd.criterions.{module} import {cls}, {cfg}
from fairseq_kd.criterions.word_kd import WordKDConfig, WordKDCriterion
from tests import toy
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
task = toy.make_task()
model = toy.make_model(task)
task.teacher = toy.make_teacher(task)
sample = toy.make_sample(task, seed=rank)  # each rank its own batch
wrapped = ModuleProxyWrapper(torch.nn.parallel.DistributedDataParallel(model))  # what fairseq's trainer builds

def rank_gap(criterion):
    model.zero_grad()
    loss = criterion(wrapped, sample, teacher=task.teacher)[0]
    loss.backward()
    grad = model.encoder.layers[0].fc1.weight.grad.clone()
    both = [torch.zeros_like(grad) for _ in range(2)]
    dist.all_gather(both, grad)
    return float((both[0] - both[1]).abs().max())

print("THROUGH_FORWARD", rank_gap(WordKDCriterion(task, WordKDConfig(sentence_avg=False))))
criterion = {cls}(task, {cfg}(sentence_avg=False))
try:
    print("BYPASS", rank_gap(criterion))
except SystemExit as e:
    print("BYPASS refused in forward:", e)
model.zero_grad()
optimizer = type("O", (), {{"backward": staticmethod(lambda loss: loss.backward())}})()
try:
    task.train_step(sample, wrapped, criterion, optimizer, 0)
    print("TRAIN_STEP ran")
except SystemExit as e:
    print("TRAIN_STEP refused:", e)
dist.destroy_process_group()
sys.stdout.flush()
import os
os._exit(0)  # what is tested is printed; torch's DDP threads have aborted an interpreter's teardown here
"""


@pytest.mark.e2e
@pytest.mark.parametrize("module, cls, cfg", [
    ("hybrid_gated_kd", "HybridGatedKDCriterion", "HybridGatedKDConfig"),
    ("tie_kd", "TieKDCriterion", "TieKDConfig"),
])
def test_under_torch_ddp_on_two_gloo_ranks_the_task_refuses_before_any_step(module, cls, cfg):
    """torch's DDP on 2 CPU ranks: through the wrapped forward (word_kd) the ranks' gradients are
    all-reduced; calling encoder and decoder separately they are not, and the task refuses that."""
    script = DDP_RANK.format(repo=cli.REPO, module=module, cls=cls, cfg=cfg, port=cli.free_port())
    procs = [subprocess.Popen([sys.executable, "-c", script, str(rank)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=cli.REPO, env=ENV) for rank in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        assert float(re.search(r"THROUGH_FORWARD (\S+)", out).group(1)) == 0.0
        bypass = re.search(r"BYPASS (\S+)", out)
        if bypass and bypass.group(1) != "refused":
            assert float(bypass.group(1)) > 1e-6  # the silent failure: the ranks' gradients differ
        assert "TRAIN_STEP refused:" in out and "--ddp-backend legacy_ddp" in out, out


# ---- non-finite teacher output ---------------------------------------------------------------------------


def nan_teacher(task):
    teacher = toy.make_teacher(task)
    with torch.no_grad():
        teacher.models[0].decoder.layers[0].fc1.weight[0, 0] = math.nan  # after loading: a runtime NaN
    return teacher


@pytest.mark.parametrize("make", [
    lambda task: WordKDCriterion(task, WordKDConfig(sentence_avg=False)),
    lambda task: HybridGatedKDCriterion(task, HybridGatedKDConfig(sentence_avg=False)),
])
def test_nonfinite_teacher_output_stops_at_that_step_naming_teacher_and_batch(make):
    task = toy.make_task()
    model, sample = toy.make_model(task), toy.make_sample(task)
    criterion = make(task)
    task.teacher = toy.make_teacher(task)
    train_step(task, criterion, model, sample, update_num=0)  # a finite teacher: no complaint
    task.teacher = nan_teacher(task)
    task.teacher.paths = ["teacher.pt"]
    with pytest.raises(DistillationError) as info:
        train_step(task, criterion, model, sample, update_num=6)
    message = str(info.value)
    assert "teacher teacher.pt produced NaN/inf" in message and "update 7" in message
    assert str(sample["id"][:5].tolist()) in message


def test_cache_build_refuses_nonfinite_teacher_output_and_writes_nothing(prepared, teacher_ckpt, tmp_path):
    import numpy as np

    from fairseq_kd.cache.build import build_shard
    from fairseq_kd.decoding.fairseq_backend import build_task

    task = build_task(prepared.bin, "en", "de")  # as the cache build sets it up
    task.cfg.dataset_impl, task.cfg.required_seq_len_multiple = None, 1
    task.load_dataset("valid")
    teacher = load_teacher([teacher_ckpt], task).to("cpu")
    with torch.no_grad():
        teacher.models[0].decoder.layers[0].fc1.weight[0, 0] = math.nan
    with pytest.raises(DistillationError, match=f"teacher {teacher_ckpt} produced NaN/inf log-probabilities"):
        build_shard(teacher, task.datasets["valid"], str(tmp_path), 0, 1, 8, 1.0, np.uint16, "cpu", 4096, None,
                    progress=False)
    assert not [n for n in os.listdir(tmp_path) if not n.endswith(".tmp")]  # no shard under its final name


def test_iterative_distillation_refuses_the_teacher_cache(prepared, tmp_path):
    from fairseq_kd.tasks.iterative_distillation import IterativeDistillationConfig, IterativeDistillationTask

    cfg = IterativeDistillationConfig(data=prepared.bin, source_lang="en", target_lang="de",
                                      teacher_cache=str(tmp_path), unlabeled_subset="mono")
    with pytest.raises(DistillationError, match="--teacher-cache .* pass --teacher-path"):
        IterativeDistillationTask.setup_task(cfg)


def test_teacher_flag_ignores_minus_inf_and_resets():
    teacher = TeacherEnsemble([torch.nn.Linear(1, 1)])
    teacher._flag_nonfinite(torch.tensor([[0.0, -math.inf]]))
    assert teacher.take_nonfinite() is False
    teacher._flag_nonfinite(torch.tensor([[math.nan, 0.0]]))
    teacher._flag_nonfinite(torch.tensor([[0.0, 0.0]]))
    assert teacher.take_nonfinite() is True and teacher.take_nonfinite() is False


# ---- bad checkpoints and teachers ---------------------------------------------------------------------


@pytest.fixture
def teacher_state(teacher_ckpt):
    return torch.load(teacher_ckpt, map_location="cpu", weights_only=True)


def test_truncated_teacher_checkpoint(prepared, teacher_ckpt, tmp_path):
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(open(teacher_ckpt, "rb").read()[:5000])
    with pytest.raises(DistillationError, match=f"cannot load checkpoint {bad}.*truncated or not a fairseq"):
        load_teacher([str(bad)], real_task(prepared.bin))


def test_text_file_as_checkpoint(prepared, tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("this is not a checkpoint\n")
    with pytest.raises(DistillationError, match=f"cannot load checkpoint {bad}"):
        load_teacher([str(bad)], real_task(prepared.bin))


def test_teacher_output_layer_not_matching_the_dictionary(prepared, teacher_state, tmp_path):
    for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        if key in teacher_state["model"]:
            teacher_state["model"][key] = teacher_state["model"][key][:-3].clone()
    path = tmp_path / "small_vocab.pt"
    torch.save(teacher_state, path)
    task = real_task(prepared.bin)
    with pytest.raises(DistillationError, match=rf"{len(task.source_dictionary) - 3} rows but the task's source"):
        load_teacher([str(path)], task)


def test_teacher_with_nan_weights_is_refused_at_load(prepared, teacher_state, tmp_path):
    teacher_state["model"]["decoder.layers.0.fc1.weight"][0, 0] = math.nan
    path = tmp_path / "nan.pt"
    torch.save(teacher_state, path)
    with pytest.raises(DistillationError, match=f"teacher {path}: parameter decoder.layers.0.fc1.weight holds NaN"):
        load_teacher([str(path)], real_task(prepared.bin))


@pytest.mark.e2e
def test_cli_nan_teacher_with_word_kd_is_one_line(prepared, teacher_state, tmp_path):
    teacher_state["model"]["decoder.layers.0.fc1.weight"][0, 0] = math.nan
    path = tmp_path / "nan.pt"
    torch.save(teacher_state, path)
    proc = cli.train(prepared.bin, str(tmp_path / "s"), *KD, "--teacher-path", path, "--criterion", "word_kd",
                     "--max-update", "1", check=False)
    one_line_error(proc, str(path), "NaN")
    assert not os.path.exists(tmp_path / "s" / "crash.pt")


@pytest.mark.e2e
def test_truncated_checkpoint_last_on_resume_is_one_line(prepared, tmp_path):
    save = tmp_path / "run"
    save.mkdir()
    (save / "checkpoint_last.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    proc = cli.train(prepared.bin, str(save), *KD, "--criterion", "label_smoothed_cross_entropy",
                     "--max-update", "1", check=False)
    one_line_error(proc, f"cannot load checkpoint {save / 'checkpoint_last.pt'}", "delete it")


def _regenerated(dict_path):
    lines = open(dict_path, encoding="utf-8").read().splitlines()
    lines[0], lines[1] = lines[1], lines[0]  # same symbols, other ids: a re-run of fairseq-preprocess
    open(dict_path, "w", encoding="utf-8").write("".join(line + "\n" for line in lines))


@pytest.mark.e2e
def test_dictionaries_regenerated_after_the_teacher_was_trained(prepared, tmp_path):
    data = str(tmp_path / "bin")
    shutil.copytree(prepared.bin, data)
    save = str(tmp_path / "teacher")
    # trained as the pipeline trains its teacher: fairseq's translation task, the plugin loaded
    cli.train(data, save, "--user-dir", cli.USER_DIR, "--criterion", "label_smoothed_cross_entropy",
              "--max-update", "2")
    ckpt = os.path.join(save, "checkpoint_last.pt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    recorded = state["task_state"]["dictionary_sha256"]
    assert recorded["dict.de.txt"] == textio_sha256(os.path.join(data, "dict.de.txt"))
    load_teacher([ckpt], real_task(data))  # unchanged: accepted
    for lang in ("en", "de"):
        _regenerated(os.path.join(data, f"dict.{lang}.txt"))
    # teacher and student read the same regenerated files: the symbol check alone passes
    with pytest.raises(DistillationError, match=r"dict\.en\.txt changed after teacher .* was trained"):
        load_teacher([ckpt], real_task(data))


def textio_sha256(path):
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---- the unsafe-load override and weights_only -----------------------------------------------------------


def test_every_loader_refuses_the_unsafe_override(teacher_ckpt, tmp_path, monkeypatch):
    from fairseq import checkpoint_utils

    import fairseq_kd

    fairseq_kd.register()  # what --user-dir user_dir does: fairseq's own loader is the safe one

    monkeypatch.setenv(checkpoints.UNSAFE_LOAD_VARIABLE, "1")
    for load in (checkpoints.load_checkpoint_state, checkpoint_utils.load_checkpoint_to_cpu,
                 checkpoints.safe_torch_load):
        with pytest.raises(DistillationError, match=f"{checkpoints.UNSAFE_LOAD_VARIABLE}=1 is set"):
            load(teacher_ckpt)
    with pytest.raises(DistillationError, match=checkpoints.UNSAFE_LOAD_VARIABLE):
        checkpoints.average_checkpoints([teacher_ckpt], str(tmp_path / "avg.pt"))
    assert not os.path.exists(tmp_path / "avg.pt")
    monkeypatch.setenv(checkpoints.UNSAFE_LOAD_VARIABLE, "0")
    assert "model" in checkpoints.load_checkpoint_state(teacher_ckpt)


@pytest.mark.e2e
def test_generate_refuses_the_unsafe_override(prepared, teacher_ckpt):
    proc = cli.generate(prepared.bin, teacher_ckpt, check=False, env={checkpoints.UNSAFE_LOAD_VARIABLE: "1"})
    one_line_error(proc, checkpoints.UNSAFE_LOAD_VARIABLE)


def test_loaders_pass_weights_only_explicitly(teacher_ckpt, tmp_path):
    """torch < 2.6 defaults to the unrestricted unpickler: every loader passes weights_only=True itself."""
    seen = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    with mock.patch.object(torch, "load", recording_load):
        checkpoints.load_checkpoint_state(teacher_ckpt)
        checkpoints.average_checkpoints([teacher_ckpt], str(tmp_path / "avg.pt"))
    assert seen == [True, True]


def test_no_code_file_spells_the_override_or_disables_weights_only():
    needles = ("TORCH_FORCE_NO_" + "WEIGHTS_ONLY_LOAD", "weights_only=" + "False")
    for root, _, files in os.walk(cli.REPO):
        if any(part in root for part in (".git", "__pycache__", ".egg-info")):
            continue
        for name in files:
            if name.endswith((".py", ".sh", ".cfg", ".toml", ".ini")):
                text = open(os.path.join(root, name), encoding="utf-8", errors="replace").read()
                for needle in needles:
                    assert needle not in text, os.path.join(root, name)


# ---- bad text ------------------------------------------------------------------------------------------


def make_corpus(root, train, valid=None, test=None):
    """A corpus folder ``root/toy`` with the given en/de line lists (bytes or str)."""
    folder = root / "toy"
    folder.mkdir()
    head = (train[0][:20], train[1][:20])
    for split, pairs in (("train", train), ("valid", valid or head), ("test", test or head)):
        for lang, lines in zip(("en", "de"), pairs):
            data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
            (folder / f"{split}.{lang}").write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def real_pairs(prepared):
    """The first 300 Multi30k training pairs (the session slice's raw text)."""
    def lines(lang):
        return open(os.path.join(prepared.raw, f"train.{lang}"), encoding="utf-8").read().splitlines()[:300]
    return lines("en"), lines("de")


def test_invalid_utf8_names_file_and_line(tmp_path, real_pairs):
    from fairseq_kd.prepare import slice_corpus

    en, de = list(real_pairs[0]), list(real_pairs[1])
    en_bytes = [line.encode() for line in en]
    en_bytes[41] = b"caf\xe9 au lait"
    folder = make_corpus(tmp_path, (en_bytes, de))
    with pytest.raises(DistillationError, match=rf"{folder / 'train.en'}:42: not valid UTF-8.*re-encode"):
        slice_corpus(str(folder), str(tmp_path / "raw"), ("en", "de"), {})
    assert not [n for n in os.listdir(tmp_path / "raw") if n.startswith("train.en")]  # nothing half-written


def test_bom_is_dropped_from_prepared_text_and_from_the_reference(tmp_path, real_pairs):
    from fairseq_kd.prepare import slice_corpus

    en, de = ["\ufeff" + real_pairs[0][0]] + real_pairs[0][1:], ["\ufeff" + real_pairs[1][0]] + real_pairs[1][1:]
    folder = make_corpus(tmp_path, (en, de))
    slice_corpus(str(folder), str(tmp_path / "raw"), ("en", "de"), {})
    for lang, lines in (("en", real_pairs[0]), ("de", real_pairs[1])):
        assert open(tmp_path / "raw" / f"train.{lang}", encoding="utf-8").readline() == lines[0] + "\n"
    ref = tmp_path / "ref.de"
    ref.write_bytes(b"\xef\xbb\xbf" + "\n".join(real_pairs[1][:3]).encode() + b"\n")
    assert scoring.read_text(str(ref)) == real_pairs[1][:3]
    hyp = tmp_path / "hyp.de"
    hyp.write_text("\n".join(real_pairs[1][:3]) + "\n", encoding="utf-8")
    bleu, chrf, _, _ = scoring.score(str(hyp), str(ref))
    assert bleu == pytest.approx(100.0)


def test_very_long_line_is_dropped_from_train_with_a_warning(tmp_path, real_pairs, caplog):
    from fairseq_kd.prepare import prepare

    en, de = list(real_pairs[0]), list(real_pairs[1])
    en[7] = " ".join(en[:200])  # thousands of tokens
    make_corpus(tmp_path, (en, de), valid=(real_pairs[0][:20], real_pairs[1][:20]),
                test=(real_pairs[0][20:40], real_pairs[1][20:40]))
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="fairseq_kd.prepare"):
        bin_dir = prepare("toy", str(tmp_path), "en", "de", str(out), vocab_size=300, max_tokens_per_line=200)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert f"{out / 'raw' / 'train.en'}:8 has" in warning and "dropped from raw, spm_text and bin" in warning
    for folder in ("raw", "spm_text"):
        for lang in ("en", "de"):
            assert textio.count_lines(str(out / folder / f"train.{lang}")) == len(en) - 1
    assert open(out / "raw" / "train.en", encoding="utf-8").read().splitlines()[7] == en[8]
    assert os.path.exists(os.path.join(bin_dir, "train.en-de.en.bin"))


def test_very_long_line_in_test_is_a_clear_error(tmp_path, real_pairs):
    from fairseq_kd.prepare import prepare

    en, de = list(real_pairs[0]), list(real_pairs[1])
    test_en = real_pairs[0][:20]
    test_en[3] = " ".join(en[:200])
    make_corpus(tmp_path, (en, de), test=(test_en, real_pairs[1][:20]))
    with pytest.raises(DistillationError, match=r"test\.en:4 has \d+ tokens.*fairseq-generate cannot translate"):
        prepare("toy", str(tmp_path), "en", "de", str(tmp_path / "out"), vocab_size=300, max_tokens_per_line=200)


def test_lone_carriage_return_in_teacher_translations(prepared, tmp_path):
    from fairseq_kd.decoding.binarize import binarize

    data = str(tmp_path / "bin")
    shutil.copytree(prepared.bin, data)
    lines = open(os.path.join(prepared.spm_text, "valid.de"), encoding="utf-8").read().splitlines()
    bad = tmp_path / "valid_teacher.txt"
    broken = [line.replace(" ", "\r", 1) if i == 4 else line for i, line in enumerate(lines)]
    bad.write_bytes("".join(line + "\n" for line in broken).encode())
    assert textio.count_lines(str(bad)) == len(lines)  # wc -l sees nothing wrong
    with pytest.raises(DistillationError, match=rf"{bad}:5: a carriage return inside the line"):
        binarize(str(bad), data, "valid_teacher", "en", "de", split="valid")
    # written through the project's writer, the line stays one line
    fixed = tmp_path / "fixed.txt"
    textio.write_lines_atomic(str(fixed), [l.replace(" ", "\r", 1) if i == 4 else l for i, l in enumerate(lines)])
    assert open(fixed, encoding="utf-8").read().splitlines() == lines
    binarize(str(fixed), data, "valid_teacher", "en", "de", split="valid")


# ---- decoding: concurrent writers and kills --------------------------------------------------------------


SOURCES = [f"w{i % 20} w{(i * 7) % 20} w{(i * 3) % 20}" for i in range(40)]


def text_corpus(tmp_path):
    d = toy.make_dictionary()
    src = tmp_path / "train.bpe.src"
    src.write_text("".join(s + "\n" for s in SOURCES))
    return decoding.corpus_from_text(str(src), None, d, d)


def echo(sample, **_):
    return [[("echo " + str(int(i)), -1.0)] for i in sample["id"]]


def test_temporary_names_are_unique_per_process_and_call(tmp_path):
    path = str(tmp_path / "x.txt")
    assert len({textio.unique_tmp(path) for _ in range(50)}) == 50
    assert f".tmp{os.getpid()}-" in textio.unique_tmp(path)


def test_second_decode_of_a_held_shard_stops_with_the_holder(tmp_path):
    out = str(tmp_path / "dec")
    c = text_corpus(tmp_path)
    os.makedirs(out)
    final = decoding.shard_path(out, 0, 2)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(final + ".lock", "w") as f:
            json.dump({"host": socket.gethostname(), "pid": holder.pid}, f)
        with pytest.raises(DistillationError, match=rf"being decoded by process {holder.pid} on host .*--shard-id"):
            decoding.decode_corpus(c, echo, out, num_shards=2, shard_ids=[0], progress=False)
        assert not os.path.exists(final) and not partial_shards(final)
    finally:
        holder.kill()
        holder.wait()
    # its holder gone, the lock is stale: taken over, the shard decoded, the lock removed
    assert decoding.decode_corpus(c, echo, out, num_shards=2, shard_ids=[0], progress=False) == [0]
    assert not os.path.exists(final + ".lock")
    assert len(open(final).read().splitlines()) == 20


def test_lock_is_exclusive_within_one_host(tmp_path):
    final = str(tmp_path / "shard000-of-001.jsonl")
    with shard_lock(final):
        with pytest.raises(DistillationError, match=f"being decoded by process {os.getpid()}"):
            with shard_lock(final):
                pass
    with shard_lock(final):  # released
        pass


DECODE_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
from fairseq_kd import decoding
from tests import toy
d = toy.make_dictionary()
c = decoding.corpus_from_text({src!r}, None, d, d)
def slow(sample, **_):
    time.sleep({delay})
    return [[("echo " + str(int(i)), -1.0)] for i in sample["id"]]
decoding.decode_corpus(c, slow, {out!r}, num_shards=2, max_sentences=2, progress=False)
"""


def test_decoding_killed_mid_shard_resumes_without_duplicate_or_missing_lines(tmp_path):
    c = text_corpus(tmp_path)
    out = str(tmp_path / "dec")
    script = DECODE_SCRIPT.format(repo=cli.REPO, src=str(tmp_path / "train.bpe.src"), out=out, delay=0.2)
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, cwd=cli.REPO)
    shard0 = decoding.shard_path(out, 0, 2)
    try:
        while not partial_shards(shard0):
            assert proc.poll() is None, "the decode ended before it could be killed"
            time.sleep(0.05)
        time.sleep(0.5)  # a few batches into shard 0 (of 10 batches, 0.2 s each)
        assert not os.path.exists(shard0)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not os.path.exists(shard0)  # no half-written final file
    assert partial_shards(shard0) and os.path.exists(shard0 + ".lock")
    with pytest.raises(DistillationError, match=r"shard\(s\) 0 \(incomplete\), 1 \(missing\)"):
        decoding.merge(out, str(tmp_path / "t.txt"), progress=False)
    assert decoding.decode_corpus(c, echo, out, num_shards=2, progress=False) == [0, 1]  # stale lock taken over
    decoding.merge(out, str(tmp_path / "t.txt"), progress=False)
    assert open(tmp_path / "t.txt").read().splitlines() == [f"echo {i}" for i in range(len(SOURCES))]
    assert sorted(os.listdir(out)) == sorted(
        ["manifest.json", os.path.basename(shard0), os.path.basename(decoding.shard_path(out, 1, 2))])


# ---- KD state on resume: SIGKILL mid-epoch, resumed == uninterrupted -------------------------------------


@pytest.fixture(scope="module")
def kd_data(prepared, tmp_path_factory):
    """The slice plus a ``train_teacher`` subset (the gold target binarized under the teacher-target name)."""
    data = str(tmp_path_factory.mktemp("kd_data") / "bin")
    shutil.copytree(prepared.bin, data)
    for ext in ("bin", "idx"):
        shutil.copy(os.path.join(data, f"train.en-de.de.{ext}"), os.path.join(data, f"train_teacher.en-de.de.{ext}"))
    return data


CRITERIA = {
    "word_kd": ["--criterion", "word_kd"],
    "seq_kd": ["--criterion", "seq_kd", "--teacher-target-subset", "train_teacher", "--kd-alpha", "0.5"],
    "tie_kd": ["--criterion", "tie_kd", "--tie-iterations", "2"],
    "self_evolution_kd": ["--criterion", "self_evolution_kd"],
    "hybrid_gated_kd": ["--criterion", "hybrid_gated_kd", "--gate", "scalar"],
    "selective_kd": ["--criterion", "selective_kd", "--selective-strategy", "global_level",
                     "--selective-queue-size", "5000"],
}
RESUME = ["--max-update", "4", "--save-interval-updates", "2", "--keep-interval-updates", "1",
          "--disable-validation", "--log-interval", "1"]


def train_cmd(data, save_dir, teacher, flags):
    return [sys.executable, "-m", "fairseq_cli.train", data, "--save-dir", save_dir, *cli.TINY_ARCH,
            *cli.TINY_OPTIM, *KD, "--teacher-path", teacher, *flags, *RESUME]


def kill_after(cmd, update, log_path):
    """Run ``cmd`` and SIGKILL it once it logs update ``update`` (the save of the update before is done)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cli.REPO,
                                env=ENV)
        for line in proc.stdout:
            log.write(line)
            if re.search(rf"num_updates={update}\b", line):
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, open(log_path).read()[-3000:]


def assert_same_training_state(a, b):
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 4
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6, msg=key)
    opt_a, opt_b = a["last_optimizer_state"]["state"], b["last_optimizer_state"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for k in opt_a:
        for name, value in opt_a[k].items():
            if torch.is_tensor(value):
                torch.testing.assert_close(value, opt_b[k][name], rtol=0, atol=1e-6)
    assert (a.get("criterion") is None) == (b.get("criterion") is None)
    for key, value in (a.get("criterion") or {}).items():
        torch.testing.assert_close(value, b["criterion"][key], rtol=0, atol=1e-6)
    kd_a, kd_b = a["task_state"].get("criterion"), b["task_state"].get("criterion")
    assert (kd_a is None) == (kd_b is None)
    for key, value in (kd_a or {}).items():
        torch.testing.assert_close(value, kd_b[key], rtol=0, atol=1e-6)


#: criterions whose state goes beyond model + optimizer (the queue, the gate), and word_kd: SIGKILLed for real
KILLED = ("hybrid_gated_kd", "selective_kd", "word_kd")


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_sigkill_mid_epoch_and_resume_equals_uninterrupted(name, kd_data, teacher_ckpt, tmp_path):
    """Resumed at update 2 of 4 (mid-epoch), a run ends where the uninterrupted one does.  For KILLED the
    interrupted run is SIGKILLed after logging update 3; for the others (whose state is model + optimizer
    only) the resume starts from the uninterrupted run's own update-2 checkpoint, saving one training run."""
    flags = CRITERIA[name]
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    cli.run("fairseq_cli.train", train_cmd(kd_data, ref_dir, teacher_ckpt, flags)[3:] + ["--keep-interval-updates", "2"])
    if name in KILLED:
        kill_after(train_cmd(kd_data, run_dir, teacher_ckpt, flags), 3, tmp_path / "killed.log")
    else:
        os.makedirs(run_dir)
        shutil.copy(os.path.join(ref_dir, "checkpoint_1_2.pt"), os.path.join(run_dir, "checkpoint_last.pt"))
    killed = torch.load(os.path.join(run_dir, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    assert killed["optimizer_history"][-1]["num_updates"] == 2
    assert killed["extra_state"]["train_iterator"]["iterations_in_epoch"] == 2  # mid-epoch
    resumed = cli.run("fairseq_cli.train", train_cmd(kd_data, run_dir, teacher_ckpt, flags)[3:])
    assert "loaded checkpoint" in (resumed.stdout + resumed.stderr).lower()
    a = torch.load(os.path.join(ref_dir, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    b = torch.load(os.path.join(run_dir, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    assert_same_training_state(a, b)
    if name == "selective_kd":
        history = b["task_state"]["criterion"]["selective_history"]
        assert 0 < history.numel() <= 5000
        assert "restored the training state of criterion SelectiveKDCriterion" in resumed.stdout + resumed.stderr


def test_selective_queue_state_round_trip():
    from fairseq_kd.criterions.selective_kd import SelectiveKDConfig, SelectiveKDCriterion

    task = toy.make_task()
    cfg = SelectiveKDConfig(selective_strategy="global_level", selective_queue_size=4, sentence_avg=False)
    a, b = SelectiveKDCriterion(task, cfg), SelectiveKDCriterion(task, cfg)
    a.push_history(torch.tensor([1.0, 2.0, 3.0]))
    a.push_history(torch.tensor([4.0, 5.0]))
    b.load_kd_state_dict(a.kd_state_dict())
    assert b.history.tolist() == [2.0, 3.0, 4.0, 5.0]
    assert b.push_history(torch.tensor([6.0])).tolist() == a.push_history(torch.tensor([6.0])).tolist()


# ---- 2 ranks vs 1 rank with --update-freq 2 ------------------------------------------------------------------

#: plain SGD and no dropout: both runs see the same two batches per update, so they differ by the float
#: summation order of the gradient alone (Adam's first steps would amplify that noise to ~lr)
PARITY = ["--optimizer", "sgd", "--lr", "0.5", "--lr-scheduler", "fixed", "--dropout", "0",
          "--attention-dropout", "0", "--max-update", "2", "--disable-validation"]
PARITY_TOLERANCE = 1e-5


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["word_kd", "tie_kd", "self_evolution_kd", "hybrid_gated_kd"])
def test_two_ranks_equal_one_rank_with_double_update_freq(name, prepared, teacher_ckpt, tmp_path):
    flags = [*KD, "--teacher-path", teacher_ckpt, *CRITERIA[name], *PARITY]
    one = str(tmp_path / "one")
    cli.train(prepared.bin, one, *flags, "--update-freq", "2")
    two = str(tmp_path / "two")
    for proc in run_two_ranks(prepared.bin, two, flags, "legacy_ddp"):
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    a = torch.load(os.path.join(one, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    b = torch.load(os.path.join(two, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 2
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=PARITY_TOLERANCE, msg=key)
    for key, value in (a.get("criterion") or {}).items():
        torch.testing.assert_close(value, b["criterion"][key], rtol=0, atol=PARITY_TOLERANCE)


# ---- recipe stages: what a redone stage leaves behind, what the fingerprint sees, what is checked at start ----

def _recipe(tmp_path):
    from tests.test_wmt_recipes import WMT_RUN, FakePython, run_recipe, started

    fake = FakePython(tmp_path / "fake")
    work = tmp_path / "w"
    args = ["--pair", "en-ro", "--scale", "cpu", "--students", "baseline", "--work", work]
    return fake, work, args, lambda extra=(), env=None: run_recipe(WMT_RUN, [*args, *extra], env or fake.env), started


def test_a_redone_stage_moves_its_outputs_aside_and_trains_from_scratch(tmp_path):
    fake, work, args, run, started = _recipe(tmp_path)
    assert run().returncode == 0
    (work / "student_baseline" / "checkpoint_last.pt").write_text("first run\n")
    proc = run(["--student-args", "--dropout 0.2"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert started(proc.stdout) == ["student_baseline", "translate_student_baseline", "score"]
    # fairseq-train did not see the old checkpoint_last.pt (it would have resumed it under the new settings)
    assert (work / "student_baseline" / "checkpoint_last.pt").read_text() == "weights\n"
    (student,) = (work / "stages" / "stale").glob("student_baseline.*")
    assert (student / "student_baseline" / "checkpoint_last.pt").read_text() == "first run\n"
    (translation,) = (work / "stages" / "stale").glob("translate_student_baseline.*")
    assert sorted(p.name for p in translation.iterdir()) == ["student_baseline.test.gen", "student_baseline.test.hyp"]
    assert re.search(r"^   student_baseline: its previous outputs \(\d\) moved aside to .*stale/student_baseline\.",
                     proc.stdout, flags=re.M)
    assert not list((work / "stages" / "stale").glob("prepare.*"))  # prepare's steps redo from their own stamps


def test_a_stage_interrupted_under_other_settings_does_not_resume(tmp_path):
    fake, work, args, run, started = _recipe(tmp_path)
    assert run().returncode == 0
    marker = work / "stages" / "student_baseline.done"
    key = re.search(r"^key \w+$", marker.read_text(), flags=re.M).group(0)
    # killed mid-run under other settings: no marker, the record of the settings it started with
    os.remove(marker)
    (work / "stages" / "student_baseline.started").write_text("key 0123456789abcdef\n")
    proc = run()
    assert proc.returncode == 0 and "student_baseline" in started(proc.stdout)
    assert (work / "student_baseline" / "checkpoint_last.pt").read_text() == "weights\n"
    assert not (work / "stages" / "student_baseline.started").exists()
    # killed under the same settings: it resumes from its checkpoint_last.pt (fairseq's resume)
    os.remove(marker)
    (work / "stages" / "student_baseline.started").write_text(key + "\n")
    proc = run()
    assert proc.returncode == 0 and "student_baseline" in started(proc.stdout)
    assert (work / "student_baseline" / "checkpoint_last.pt").read_text() == "weights resumed\n"


def test_a_corpus_edited_in_place_with_the_same_size_redoes_prepare(tmp_path):
    corpus = tmp_path / "corpora" / "tatoeba_en_ro"
    corpus.mkdir(parents=True)
    for split in ("train", "valid"):
        for lang in ("en", "ro"):
            (corpus / f"{split}.{lang}").write_text("".join(f"{split} {lang} {i}\n" for i in range(60)))
    fake, work, args, run, started = _recipe(tmp_path)
    data_root = ["--data-root", tmp_path / "corpora"]
    assert run(data_root).returncode == 0
    assert started(run(data_root).stdout) == []
    text = (corpus / "train.en").read_text()
    (corpus / "train.en").write_text(text.replace("train en 1\n", "train en 7\n", 1))  # same size, other content
    proc = run(data_root)
    assert proc.returncode == 0 and started(proc.stdout)[:2] == ["prepare", "teacher"], proc.stdout[-2000:]
    assert "prepare: its settings changed since it ran" in proc.stdout
    cache = (work / "stages" / "digests").read_text().splitlines()
    assert len([line for line in cache if line.endswith("/train.en")]) == 2  # re-read once, on its new mtime


def _path_without(tool):
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if not os.path.exists(os.path.join(d, tool)))


@pytest.mark.parametrize("dry_run", [False, True])
def test_slurm_launcher_without_srun_is_refused_before_any_stage(tmp_path, dry_run):
    fake, work, args, run, started = _recipe(tmp_path)
    env = dict(fake.env, PATH=_path_without("srun"))
    proc = run(["--launcher", "slurm", *(["--dry-run"] if dry_run else [])], env)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "run.sh: error: LAUNCHER=slurm needs srun, which is not on PATH: run the recipe inside a SLURM allocation "
        "(sbatch or salloc) on the cluster"], proc.stderr
    assert "== stage" not in proc.stdout and not fake.calls("fairseq_kd.prepare")


def test_extra_test_files_are_checked_before_any_stage_and_a_missing_final_newline_is_a_line(tmp_path):
    study = os.path.join(cli.REPO, "examples", "multi30k", "study.sh")
    src, ref = tmp_path / "held.en", tmp_path / "held.de"
    src.write_text("".join(f"a {i}\n" for i in range(12)))
    ref.write_text("".join(f"b {i}\n" for i in range(12)).rstrip("\n"))  # 12 lines, wc -l says 11
    check = f'source {cli.REPO}/scripts/lib/pipeline.sh; RECIPE=study.sh; check_extra_test held "$1" "$2" && echo ok'
    ok = subprocess.run(["bash", "-c", check, "_", str(src), str(ref)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == "ok\n", ok.stderr
    base = ["bash", study, "--size", "tiny", "--work", str(tmp_path / "w")]
    missing = subprocess.run([*base, "--extra-test", f"held={src},{tmp_path / 'nope.de'}"], capture_output=True,
                             text=True, env=ENV, timeout=300)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines() == [
        f"study.sh: error: --extra-test held: {tmp_path / 'nope.de'} not found; pass NAME=SRC_FILE,REF_FILE "
        "with existing files"], missing.stderr
    assert "== stage" not in missing.stdout and not (tmp_path / "w" / "data").exists()
    ref.write_text("b\n" * 11)
    short = subprocess.run([*base, "--extra-test", f"held={src},{ref}"], capture_output=True, text=True, env=ENV,
                           timeout=300)
    assert short.returncode == 1 and short.stderr.strip().splitlines() == [
        f"study.sh: error: --extra-test held: {ref} has 11 lines but {src} has 12; pass a reference with one "
        "line per source line"], short.stderr
    assert "delete" not in short.stderr


def test_no_script_counts_lines_with_wc(tmp_path):
    """A last line without a newline is a line: every script counts with count_lines (scripts/lib/text.sh)."""
    scripts = [os.path.join(d, f) for d in ("scripts", "scripts/lib", "examples/multi30k", "examples/wmt14")
               for f in os.listdir(os.path.join(cli.REPO, d)) if f.endswith(".sh")]
    counting = re.compile(r"^[^#]*\bwc -l", flags=re.M)  # in code, not in a comment
    assert [s for s in scripts if counting.search(open(os.path.join(cli.REPO, s)).read())] == []
    f = tmp_path / "t"
    f.write_bytes(b"one\ntwo")
    out = subprocess.run(["bash", "-c", f'source {cli.REPO}/scripts/lib/text.sh; count_lines "$1"', "_", str(f)],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "2"
