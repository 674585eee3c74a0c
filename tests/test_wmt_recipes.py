"""The WMT recipes: corpus download/build (fake downloader), the shared pipeline, run.sh per pair.

* ``scripts/prepare-wmt.sh`` runs against a fake ``curl`` (on PATH) that
  serves small archives built here from real lines of ``../shared/data`` in the
  layout of the official WMT archives, and a fake ``sacrebleu`` that serves the
  valid/test sets: corpus files, cleaning, line counts, observed checksums,
  checksum pins and their one-line errors, skip on re-run.
* ``examples/wmt14/run.sh --pair en-ro --scale cpu`` runs for real on a small
  slice of tatoeba_en_ro (fairseq-train/generate, sacrebleu), then again to
  check that every stage is skipped.
* The full-scale wiring (paper settings, checkpoint averaging, iterative rounds)
  and the main job's refactor run with a fake ``python`` that records every call.
"""

import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest

from tests import cli

REPO = cli.REPO
DATA = cli.SHARED_DATA
PREPARE_WMT = os.path.join(REPO, "scripts", "prepare-wmt.sh")
WMT_RUN = os.path.join(REPO, "examples", "wmt14", "run.sh")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def shared_lines(corpus, name):
    path = os.path.join(DATA, corpus, name)
    if os.path.exists(path + ".gz"):
        with gzip.open(path + ".gz", "rt", encoding="utf-8") as f:
            return f.read().split("\n")[:-1]
    return read(path)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def text(lines):
    return "".join(line + "\n" for line in lines).encode("utf-8")


def make_archive(path, members):
    """A .tgz/.tar/.zip at ``path`` holding ``{member name: bytes}``."""
    if path.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as z:
            for name, payload in members.items():
                z.writestr(name, payload)
        return
    with tarfile.open(path, "w:gz" if path.endswith(".tgz") else "w") as t:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))


def clean_corpus_n(src, tgt, max_words=250, ratio=1.5):
    """Moses clean-corpus-n semantics on whitespace words: the pairs the recipe must keep."""
    kept = []
    for s, t in zip(src, tgt):
        s, t = s.replace("\r", " ").strip(), t.replace("\r", " ").strip()
        ns, nt = len(s.split()), len(t.split())
        if 1 <= ns <= max_words and 1 <= nt <= max_words and ns <= ratio * nt and nt <= ratio * ns:
            kept.append((s, t))
    return kept


FAKE_CURL = r'''
import os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write("curl " + " ".join(args) + "\n")
out = args[args.index("--output" if "--output" in args else "-o") + 1]
url = args[-1]
served = os.path.join(os.environ["FAKE_SERVER"], url.rsplit("/", 1)[-1])
if not os.path.exists(served):
    sys.stderr.write("curl: (22) The requested URL returned error: 404\n")
    sys.exit(22)
shutil.copyfile(served, out)
'''

FAKE_SACREBLEU = r'''
import os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write("sacrebleu " + " ".join(args) + "\n")
test_set, langpair, side = args[args.index("-t") + 1], args[args.index("-l") + 1], args[args.index("--echo") + 1]
path = os.path.join(os.environ["FAKE_TESTSETS"], f"{test_set.replace('/', '_')}.{langpair}.{side}")
if not os.path.exists(path):
    sys.stderr.write(f"sacreBLEU: No such test set {test_set} {langpair}\n")
    sys.exit(1)
sys.stdout.write(open(path, encoding="utf-8").read())
'''


def write_tool(folder, name, source):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\n{source}")
    os.chmod(path, 0o755)
    return path


class FakeWorld:
    """A fake curl and sacrebleu on PATH, a folder they serve from, and their call log.

    ``prepare`` runs ``python -m fairseq_kd.wmt prepare`` in this process
    (through its ``main``: exit status, stdout and stderr as a CompletedProcess;
    saves the package import of a subprocess), ``prepare_sh`` through
    ``scripts/prepare-wmt.sh``.
    """

    def __init__(self, root, monkeypatch, capfd):
        self.root = str(root)
        self.capfd = capfd
        self.server = os.path.join(self.root, "server")
        self.testsets = os.path.join(self.root, "testsets")
        self.log = os.path.join(self.root, "calls.log")
        bin_dir = os.path.join(self.root, "bin")
        os.makedirs(self.server)
        os.makedirs(self.testsets)
        write_tool(bin_dir, "curl", FAKE_CURL)
        write_tool(bin_dir, "sacrebleu", FAKE_SACREBLEU)
        self.env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ["PATH"], FAKE_LOG=self.log,
                        FAKE_SERVER=self.server, FAKE_TESTSETS=self.testsets)
        self.env.pop("DOWNLOAD", None)
        self.env.pop("SACREBLEU", None)
        for name in ("PATH", "FAKE_LOG", "FAKE_SERVER", "FAKE_TESTSETS"):
            monkeypatch.setenv(name, self.env[name])
        monkeypatch.delenv("DOWNLOAD", raising=False)
        monkeypatch.delenv("SACREBLEU", raising=False)

    def serve(self, url_name, members):
        path = os.path.join(self.server, url_name)
        make_archive(path, members)
        return path

    def test_set(self, name, langpair, src, ref):
        for side, lines in (("src", src), ("ref", ref)):
            with open(os.path.join(self.testsets, f"{name.replace('/', '_')}.{langpair}.{side}"), "wb") as f:
                f.write(text(lines))

    def calls(self, tool):
        if not os.path.exists(self.log):
            return []
        return [line for line in read(self.log) if line.startswith(tool + " ")]

    def prepare(self, *args):
        from fairseq_kd.wmt.cli import main

        argv = ["prepare", *map(str, args)]
        self.capfd.readouterr()
        try:
            main(argv)
            status = 0
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
        out, err = self.capfd.readouterr()
        return subprocess.CompletedProcess(argv, status, out, err)

    def prepare_sh(self, *args):
        return subprocess.run(["bash", PREPARE_WMT, *map(str, args)], capture_output=True, text=True,
                              env=self.env, cwd=REPO, timeout=300)


def cycle(lines, n):
    return [lines[i % len(lines)] for i in range(n)]


def error_line(proc, prog="prepare-wmt"):
    """The single error line of a failed run (and no traceback anywhere)."""
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-2000:]
    return errors[0]


# ---- en-ro: WMT'16 (Europarl v8 + SETIMES2; newsdev2016 / newstest2016) --------------------------------

EP_V8_URL_NAME = "training-parallel-ep-v8.tgz"
SETIMES_URL_NAME = "en-ro.txt.zip"  # https://object.pouta.csc.fi/OPUS-SETIMES/v2/moses/en-ro.txt.zip


@pytest.fixture()
def en_ro_world(tmp_path, monkeypatch, capfd):
    """Fake WMT'16 En-Ro sources from tatoeba_en_ro lines, with a few pairs the cleaning must drop or fix."""
    world = FakeWorld(tmp_path / "world", monkeypatch, capfd)
    en, ro = shared_lines("tatoeba_en_ro", "train.en"), shared_lines("tatoeba_en_ro", "train.ro")
    ep_en, ep_ro = en[:3000], ro[:3000]
    # injected: empty target, an over-long pair, a 1:4 length ratio, and a carriage return inside a kept pair
    ep_en += ["An orphan source line.", " ".join(["word"] * 260), "Yes.", "Line one\rcontinued here."]
    ep_ro += ["", " ".join(["cuvânt"] * 260), "Da, da, da, da.", "Rândul unu\rcontinuat aici."]
    st_en, st_ro = en[3000:], ro[3000:]
    world.ep = (ep_en, ep_ro)
    world.st = (st_en, st_ro)
    world.ep_archive = world.serve(EP_V8_URL_NAME, {
        "training-parallel-ep-v8/europarl-v8.ro-en.en": text(ep_en),
        "training-parallel-ep-v8/europarl-v8.ro-en.ro": text(ep_ro),
        "training-parallel-ep-v8/europarl-v8.et-en.et": text(["Tere."]),  # another pair in the same archive
    })
    world.st_archive = world.serve(SETIMES_URL_NAME, {
        "SETIMES.en-ro.en": text(st_en), "SETIMES.en-ro.ro": text(st_ro), "README": b"SETIMES2\n",
    })
    v_en, v_ro = shared_lines("tatoeba_en_ro", "valid.en"), shared_lines("tatoeba_en_ro", "valid.ro")
    t_en, t_ro = shared_lines("tatoeba_en_ro", "test.en"), shared_lines("tatoeba_en_ro", "test.ro")
    world.valid = (cycle(v_en, 1999), cycle(v_ro, 1999))
    world.test = (cycle(t_en, 1999), cycle(t_ro, 1999))
    world.test_set("wmt16/dev", "en-ro", *world.valid)
    world.test_set("wmt16", "en-ro", *world.test)
    return world


def test_prepare_wmt_en_ro_builds_the_corpus_and_skips_finished_downloads(en_ro_world, tmp_path):
    world = en_ro_world
    out = tmp_path / "wmt16_en_ro"
    proc = world.prepare_sh("--pair", "en-ro", "--out", out, "--extra-clean")  # through the shell wrapper, the rest in-process
    assert proc.returncode == 0, proc.stderr[-3000:]

    expected = clean_corpus_n(*world.ep) + clean_corpus_n(*world.st)
    train_en, train_ro = read(out / "train.en"), read(out / "train.ro")
    assert len(train_en) == len(train_ro) == len(expected)
    assert list(zip(train_en, train_ro)) == expected
    assert len(expected) < len(world.ep[0]) + len(world.st[0]) - 3  # the three bad pairs (and more) were dropped
    assert "An orphan source line." not in train_en and "Yes." not in train_en
    assert "Line one continued here." in train_en and not any("\r" in line for line in train_en)
    assert train_en[-1] == world.st[0][-1].strip()  # SETIMES2 after Europarl
    assert (read(out / "valid.en"), read(out / "valid.ro")) == world.valid
    assert (read(out / "test.en"), read(out / "test.ro")) == world.test
    assert [c for c in world.calls("sacrebleu")] == [
        "sacrebleu -t wmt16/dev -l en-ro --echo src", "sacrebleu -t wmt16/dev -l en-ro --echo ref",
        "sacrebleu -t wmt16 -l en-ro --echo src", "sacrebleu -t wmt16 -l en-ro --echo ref",
    ]

    # the observed sha256 of every archive, in sha256sum format under the local archive names
    observed = read(out / "checksums.observed")
    assert sorted(observed) == sorted([
        f"{sha256(world.ep_archive)}  training-parallel-ep-v8.tgz",
        f"{sha256(world.st_archive)}  SETIMES2.en-ro.txt.zip",
    ])
    assert sha256(out / "orig" / "SETIMES2.en-ro.txt.zip") == sha256(world.st_archive)
    readme = (out / "README.md").read_text()
    assert "NOT verified" in readme and f"| train.en | {len(expected)} |" in readme
    leftovers = [n for _, _, files in os.walk(out) for n in files if n.endswith(".part") or ".tmp" in n]
    assert leftovers == []
    curl_calls = world.calls("curl")
    assert len(curl_calls) == 2
    assert curl_calls[0].endswith("http://data.statmt.org/wmt16/translation-task/training-parallel-ep-v8.tgz")

    # a re-run with the same settings downloads nothing and keeps the corpus
    mtime = os.path.getmtime(out / "train.en")
    proc = world.prepare("--pair", "en-ro", "--out", out, "--extra-clean")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(world.calls("curl")) == 2
    assert proc.stderr.count("downloaded before, skipped") == 2
    assert os.path.getmtime(out / "train.en") == mtime

    # pinning the observed checksums verifies the archives in place (still no download)
    proc = world.prepare("--pair", "en-ro", "--out", out, "--checksums", out / "checksums.observed", "--extra-clean")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(world.calls("curl")) == 2
    assert "verified against" in (out / "README.md").read_text()


def test_prepare_wmt_checksum_mismatch_is_a_one_line_error(en_ro_world, tmp_path):
    world = en_ro_world
    manifest = tmp_path / "pins.sha256"
    wrong = "0" * 64
    manifest.write_text(f"{sha256(world.ep_archive)}  training-parallel-ep-v8.tgz\n{wrong}  SETIMES2.en-ro.txt.zip\n")
    out = tmp_path / "fresh"
    proc = world.prepare("--pair", "en-ro", "--out", out, "--checksums", manifest)
    line = error_line(proc)
    assert "SETIMES2.en-ro.txt.zip" in line and str(manifest) in line and wrong in line
    assert sha256(world.st_archive) in line and "re-run" in line
    # the matching archive was kept, the mismatching download was not renamed into place
    assert (out / "orig" / "training-parallel-ep-v8.tgz").exists()
    assert not (out / "orig" / "SETIMES2.en-ro.txt.zip").exists()
    assert not (out / "orig" / "SETIMES2.en-ro.txt.zip.part").exists()
    assert not (out / "train.en").exists()

    # an archive already in place that does not match its pin: delete it, or fix the pin
    proc = world.prepare("--pair", "en-ro", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = world.prepare("--pair", "en-ro", "--out", out, "--checksums", manifest)
    line = error_line(proc)
    assert str(out / "orig" / "SETIMES2.en-ro.txt.zip") in line and "delete" in line and str(manifest) in line

    # a manifest without a pin for one of the archives
    manifest.write_text(f"{sha256(world.ep_archive)}  training-parallel-ep-v8.tgz\n")
    line = error_line(world.prepare("--pair", "en-ro", "--out", out, "--checksums", manifest))
    assert "no sha256 for SETIMES2.en-ro.txt.zip" in line
    manifest.write_text("not a checksum line\n")
    assert "line 1" in error_line(world.prepare("--pair", "en-ro", "--out", out, "--checksums", manifest))


def test_prepare_wmt_damaged_inputs_are_one_line_errors(en_ro_world, tmp_path):
    world = en_ro_world
    # a test set of the wrong size (e.g. a stale sacrebleu cache)
    world.test_set("wmt16", "en-ro", world.test[0][:1500], world.test[1][:1500])
    line = error_line(world.prepare("--pair", "en-ro", "--out", tmp_path / "a"))
    assert "newstest2016" in line and "1500 lines" in line and "1999" in line
    assert not (tmp_path / "a" / "test.en").exists()

    # source and target of a corpus differ in length
    en, ro = world.ep
    world.serve(EP_V8_URL_NAME, {
        "training-parallel-ep-v8/europarl-v8.ro-en.en": text(en),
        "training-parallel-ep-v8/europarl-v8.ro-en.ro": text(ro[:-5]),
    })
    line = error_line(world.prepare("--pair", "en-ro", "--out", tmp_path / "b"))
    assert "europarl-v8.ro-en.en" in line and "europarl-v8.ro-en.ro" in line and "differ in length" in line
    assert not (tmp_path / "b" / "train.en").exists()

    # an archive without the expected member, and a failing download
    world.serve(EP_V8_URL_NAME, {"training/europarl-v8.et-en.en": text(["x"])})
    line = error_line(world.prepare("--pair", "en-ro", "--out", tmp_path / "c"))
    assert "has no member training-parallel-ep-v8/europarl-v8.ro-en.en" in line and "move it aside" in line
    os.remove(os.path.join(world.server, SETIMES_URL_NAME))
    line = error_line(world.prepare("--pair", "en-ro", "--out", tmp_path / "d"))
    assert "en-ro.txt.zip" in line and "exit status 22" in line


def test_prepare_wmt14_en_de_and_en_fr_follow_the_fairseq_file_lists(tmp_path, monkeypatch, capfd):
    """The archive layouts of fairseq's prepare-wmt14en2{de,fr}.sh (shared archives, giga-fren .tar of .gz)."""
    world = FakeWorld(tmp_path / "world", monkeypatch, capfd)
    de_en, de_de = shared_lines("opennmt_toy_en_de", "train.en"), shared_lines("opennmt_toy_en_de", "train.de")
    fr_en, fr_fr = shared_lines("multi30k_en_fr", "train.en")[:2500], shared_lines("multi30k_en_fr", "train.fr")[:2500]

    def part(lines, i, n=5):
        return lines[i * len(lines) // n:(i + 1) * len(lines) // n]

    de = {name: (part(de_en, i, 3), part(de_de, i, 3)) for i, name in enumerate(["europarl", "commoncrawl", "nc"])}
    fr = {name: (part(fr_en, i), part(fr_fr, i)) for i, name in enumerate(["europarl", "commoncrawl", "un", "nc", "giga"])}
    world.serve("training-parallel-europarl-v7.tgz", {
        "training/europarl-v7.de-en.en": text(de["europarl"][0]), "training/europarl-v7.de-en.de": text(de["europarl"][1]),
        "training/europarl-v7.fr-en.en": text(fr["europarl"][0]), "training/europarl-v7.fr-en.fr": text(fr["europarl"][1]),
        "training/europarl-v7.es-en.es": text(["Hola."]),
    })
    world.serve("training-parallel-commoncrawl.tgz", {
        "commoncrawl.de-en.en": text(de["commoncrawl"][0]), "commoncrawl.de-en.de": text(de["commoncrawl"][1]),
        "commoncrawl.fr-en.en": text(fr["commoncrawl"][0]), "commoncrawl.fr-en.fr": text(fr["commoncrawl"][1]),
    })
    world.serve("training-parallel-nc-v9.tgz", {
        "training/news-commentary-v9.de-en.en": text(de["nc"][0]),
        "training/news-commentary-v9.de-en.de": text(de["nc"][1]),
        "training/news-commentary-v9.fr-en.en": text(fr["nc"][0]),
        "training/news-commentary-v9.fr-en.fr": text(fr["nc"][1]),
    })
    world.serve("training-parallel-un.tgz", {
        "un/undoc.2000.fr-en.en": text(fr["un"][0]), "un/undoc.2000.fr-en.fr": text(fr["un"][1]),
    })
    world.serve("training-giga-fren.tar", {
        "giga-fren.release2.fixed.en.gz": gzip.compress(text(fr["giga"][0])),
        "giga-fren.release2.fixed.fr.gz": gzip.compress(text(fr["giga"][1])),
    })
    nt12_en, nt12_de = shared_lines("opennmt_toy_en_de", "valid.en"), shared_lines("opennmt_toy_en_de", "valid.de")
    world.test_set("wmt13", "en-de", nt12_en, nt12_de)  # 3000 lines, like newstest2013
    world.test_set("wmt14/full", "en-de", cycle(nt12_en, 3003), cycle(nt12_de, 3003))
    m_en, m_fr = shared_lines("multi30k_en_fr", "valid.en"), shared_lines("multi30k_en_fr", "valid.fr")
    world.test_set("wmt13", "en-fr", cycle(m_en, 3000), cycle(m_fr, 3000))
    world.test_set("wmt14/full", "en-fr", cycle(m_en, 3003), cycle(m_fr, 3003))

    orig = tmp_path / "orig"  # one download folder shared by both pairs
    for pair, corpora, tgt in (("en-de", de, "de"), ("en-fr", fr, "fr")):
        out = tmp_path / pair
        proc = world.prepare("--pair", pair, "--out", out, "--orig", orig, "--extra-clean")
        assert proc.returncode == 0, proc.stderr[-3000:]
        expected = [p for name in corpora for p in clean_corpus_n(*corpora[name])]
        assert list(zip(read(out / "train.en"), read(out / f"train.{tgt}"))) == expected
        assert len(read(out / "valid.en")) == 3000 and len(read(out / f"test.{tgt}")) == 3003
    # en-fr downloaded only the two archives en-de did not have
    names = [call.rsplit("/", 1)[-1] for call in world.calls("curl")]
    assert names == ["training-parallel-europarl-v7.tgz", "training-parallel-commoncrawl.tgz",
                     "training-parallel-nc-v9.tgz", "training-parallel-un.tgz", "training-giga-fren.tar"]
    assert len(read(tmp_path / "en-fr" / "checksums.observed")) == 5


def test_average_takes_the_last_interval_checkpoints(tmp_path):
    import torch

    save = tmp_path / "student"
    save.mkdir()
    for k, update in enumerate([10, 20, 30, 40, 50, 60]):
        torch.save({"model": {"w": torch.full((2,), float(k)), "steps": torch.tensor(update)},
                    "optimizer_history": [{"num_updates": update}]}, save / f"checkpoint_{k + 1}_{update}.pt")
    (save / "checkpoint_best.pt").write_bytes(b"")
    out = save / "checkpoint_avg.pt"
    proc = cli.run("fairseq_kd.wmt", ["average", "--dir", save, "--last", "3", "--upper-bound", "50", "--output", out])
    assert "checkpoint_3_30.pt, checkpoint_4_40.pt, checkpoint_5_50.pt" in proc.stdout
    state = torch.load(out, map_location="cpu")
    assert torch.allclose(state["model"]["w"], torch.full((2,), 3.0))  # (2 + 3 + 4) / 3
    assert state["optimizer_history"][0]["num_updates"] == 50
    proc = cli.run("fairseq_kd.wmt", ["average", "--dir", save, "--last", "7", "--output", out], check=False)
    line = error_line(proc, prog="average")
    assert "6 interval checkpoints" in line and "--keep-interval-updates 7" in line


def test_prepare_holds_out_the_end_of_valid_as_test(tmp_path):
    """--scale cpu en-de: opennmt_toy_en_de has no test split."""
    from fairseq_kd.prepare import slice_corpus

    raw = tmp_path / "raw"
    corpus = os.path.join(DATA, "opennmt_toy_en_de")
    slice_corpus(corpus, str(raw), ("en", "de"), {"train": 100, "valid": 500, "test": None}, test_from_valid=1000)
    valid_en = shared_lines("opennmt_toy_en_de", "valid.en")
    valid_de = shared_lines("opennmt_toy_en_de", "valid.de")
    assert read(raw / "test.en") == valid_en[-1000:] and read(raw / "test.de") == valid_de[-1000:]
    assert read(raw / "valid.en") == valid_en[:500] and read(raw / "valid.de") == valid_de[:500]
    assert len(read(raw / "train.de")) == 100
    proc = cli.run("fairseq_kd.prepare", ["--corpus", "opennmt_toy_en_de", "--data-root", DATA, "--src", "en",
                                          "--tgt", "de", "--out", tmp_path / "x", "--test-from-valid", "3000"],
                   check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "has 3000 lines, too few to hold out 3000" in proc.stderr.strip().splitlines()[-1]


# ---- run.sh: the real CPU-scale pipeline ------------------------------------------------------------------


def started(stdout):
    """The stages a recipe ran (``== stage k/N NAME (started ...``), in order."""
    return re.findall(r"^== stage \d+/\d+ (\w+) \(started", stdout, flags=re.M)


def skipped(stdout):
    """The stages a recipe found up to date."""
    return re.findall(r"^== stage \d+/\d+ (\w+): up to date, skipped", stdout, flags=re.M)


def run_recipe(script, args, env, timeout=300):
    return subprocess.run(["bash", script, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


@pytest.mark.e2e
def test_wmt_run_en_ro_cpu_scale_end_to_end_and_skips_finished_stages(tmp_path):
    work = tmp_path / "work"
    env = dict(os.environ, OMP_NUM_THREADS="1", TRAIN_LINES="300", VALID_LINES="40", TEST_LINES="50",
               VOCAB="300", TEACHER_UPDATES="8", STUDENT_UPDATES="8", TEST_BEAM="2")
    args = ["--pair", "en-ro", "--scale", "cpu", "--students", "baseline", "--work", work]
    proc = run_recipe(WMT_RUN, args, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = started(proc.stdout)
    assert stages == ["prepare", "teacher", "translate_teacher", "student_baseline", "translate_student_baseline", "score"]
    assert read(work / "data" / "raw" / "test.ro") == shared_lines("tatoeba_en_ro", "test.ro")[:50]
    assert len(read(work / "data" / "raw" / "train.en")) == 300
    for name in ("teacher", "student_baseline"):
        assert len(read(work / f"{name}.test.hyp")) == 50
    table = (work / "results.md").read_text()
    # BLEU, chrF and the papers' tokenized BLEU (no compound splitting for en-ro)
    rows = re.findall(r"^\| (teacher|student baseline) \| (\d+\.\d\d) \| (\d+\.\d\d) \| (\d+\.\d\d) \|$", table,
                      flags=re.M)
    assert [r[0] for r in rows] == ["teacher", "student baseline"]
    assert "sacrebleu: nrefs:1" in table and str(work / "data" / "raw" / "test.ro") in table
    assert "| system | BLEU | chrF | tok. BLEU |" in table
    assert "add --rounds N" in proc.stdout

    checkpoints = [work / d / f for d in ("teacher", "student_baseline") for f in ("checkpoint_best.pt", "checkpoint_last.pt")]
    mtimes = [os.path.getmtime(p) for p in checkpoints]
    proc = run_recipe(WMT_RUN, args, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert skipped(proc.stdout) == ["prepare", "teacher", "translate_teacher", "student_baseline",
                                    "translate_student_baseline", "score"]
    assert [os.path.getmtime(p) for p in checkpoints] == mtimes
    assert (work / "results.md").read_text() == table

    # a changed setting redoes for real: other data, models trained from scratch on them (no resume of the old
    # checkpoint_last.pt, which is moved aside with its folder), another table
    proc = run_recipe(WMT_RUN, [*args, "--set", "TRAIN_LINES=200", "--set", "VOCAB=250"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert started(proc.stdout) == stages
    assert len(read(work / "data" / "raw" / "train.en")) == 200
    assert len(read(work / "data" / "spm.vocab")) == 250
    from fairseq_kd.checkpoints import safe_torch_load

    symbols = len(read(work / "data" / "bin" / "dict.en.txt")) + 4  # <s> <pad> </s> <unk>
    for name in ("teacher", "student_baseline"):
        state = safe_torch_load(str(work / name / "checkpoint_last.pt"))
        assert state["model"]["encoder.embed_tokens.weight"].shape[0] == symbols
        assert state["optimizer_history"][-1]["num_updates"] == 8
        (old,) = (work / "stages" / "stale").glob(f"{name}.*")
        assert (old / name / "checkpoint_last.pt").exists()
    assert (work / "results.md").read_text() != table


# ---- run.sh wiring with a fake python -----------------------------------------------------------------------

FAKE_PYTHON = r'''
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_PYTHON_LOG"], "a") as f:
    f.write(json.dumps({"argv": argv, "omp": os.environ.get("OMP_NUM_THREADS")}) + "\n")

def opt(name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default

def count(path):
    with open(path) as f:
        return sum(1 for _ in f)

def write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in lines)

gpus = os.environ.get("FAKE_GPUS", "0")
if argv[0] == "-c":
    if "device_count" in argv[1]:
        print(gpus)
    sys.exit(1 if "cuda" in argv[1] and "device_count" not in argv[1] and gpus == "0" else 0)
module, args = argv[1], argv[2:]
if module == "fairseq_kd.wmt" and args[0] == "prepare":
    tgt = opt("--pair").split("-")[1]
    for split, n in (("train", 40), ("valid", 10), ("test", 12)):
        for lang in ("en", tgt):
            write(f"{opt('--out')}/{split}.{lang}", [f"{split} {i}" for i in range(n)])
elif module == "fairseq_kd.wmt" and args[0] == "average":
    write(opt("--output"), ["averaged"])
elif module == "fairseq_kd.prepare":
    out = opt("--out")
    sizes = {"train": int(opt("--train-lines", 40)), "valid": int(opt("--valid-lines", 10)),
             "test": int(opt("--test-lines", opt("--test-from-valid", 12)))}
    for split, n in sizes.items():
        for lang in (opt("--src"), opt("--tgt")):
            write(f"{out}/raw/{split}.{lang}", [f"{split} {i}" for i in range(n)])
    write(f"{out}/spm.model", ["model"])
    write(f"{out}/bin/preprocess.log", ["done"])
elif module in ("fairseq_cli.train", "torch.distributed.run"):
    if module == "torch.distributed.run" and int(opt("--nnodes", 1)) > 1 and "FAKE_RDZV_DIR" in os.environ:
        # torchrun's rendezvous: no node trains before all have started this training (the how-manyth of
        # this save dir in this node's log)
        import glob, time
        name = os.path.basename(opt("--save-dir"))
        with open(os.environ["FAKE_PYTHON_LOG"]) as f:  # this call is logged already
            n = sum(1 for line in f if json.loads(line)["argv"][:2] == ["-m", module]
                    and opt("--save-dir") in json.loads(line)["argv"])
        os.makedirs(os.environ["FAKE_RDZV_DIR"], exist_ok=True)
        key = os.path.join(os.environ["FAKE_RDZV_DIR"], f"{name}.{n}.")
        open(key + opt("--node_rank"), "w").close()
        deadline = time.time() + 30
        while len(glob.glob(key + "*")) < int(opt("--nnodes")):
            if time.time() > deadline:
                sys.exit("fake torchrun: rendezvous timed out")
            time.sleep(0.05)
    resumed = os.path.exists(os.path.join(opt("--save-dir"), "checkpoint_last.pt"))  # fairseq would resume it
    for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
        write(os.path.join(opt("--save-dir"), name), ["weights resumed" if resumed else "weights"])
elif module == "fairseq_kd.decoding" and args[0] == "decode" and "--chunk-size" in args:  # the work queue
    total = count(os.path.join(os.path.dirname(opt("--data")), "raw", "train.en"))
    size = int(opt("--chunk-size"))
    n = max(1, -(-total // size))
    write(os.path.join(opt("--out-dir"), "manifest.json"), ['{"num_shards": %d}' % n])
    for i in range(n):
        final = os.path.join(opt("--out-dir"), f"shard{i:03d}-of-{n:03d}.jsonl")
        try:
            os.close(os.open(final + ".lock", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        if not os.path.exists(final):
            write(final + ".tmp", [str(len(range(i * size, min(total, (i + 1) * size))))])
            os.replace(final + ".tmp", final)
            with open(os.environ["FAKE_PYTHON_LOG"], "a") as f:
                f.write(json.dumps({"argv": ["chunk", str(i), opt("--worker-id")], "omp": None}) + "\n")
        os.remove(final + ".lock")
    while "--wait" in args and not all(os.path.exists(os.path.join(opt("--out-dir"), f"shard{i:03d}-of-{n:03d}.jsonl"))
                                       for i in range(n)):
        import time; time.sleep(0.05)
elif module == "fairseq_kd.decoding" and args[0] == "decode":
    n, i = int(opt("--num-shards")), int(opt("--shard-id"))
    total = count(os.path.join(os.path.dirname(opt("--data")), "raw", "train.en"))
    write(os.path.join(opt("--out-dir"), f"shard{i:03d}-of-{n:03d}.jsonl"), [str(len(range(i, total, n)))])
elif module == "fairseq_kd.decoding" and args[0] == "merge":
    shards = [os.path.join(opt("--out-dir"), s) for s in os.listdir(opt("--out-dir"))
              if s.startswith("shard") and s.endswith(".jsonl")]
    write(opt("--output"), ["teacher output"] * sum(int(open(s).read()) for s in shards))
elif module == "fairseq_kd.decoding" and args[0] == "binarize":
    pass
elif module == "fairseq_cli.generate":
    raw = os.path.join(os.path.dirname(args[0]), "raw")
    ref = [f for f in os.listdir(raw) if f.startswith("test.") and f != "test.en"][0]
    for i in range(count(os.path.join(raw, ref))):
        print(f"D-{i}\t-0.5\thypothesis {i}")
elif module == "fairseq_kd.scoring" and args[0] == "extract":
    write(args[2], ["hypothesis"] * int(opt("--expect-lines")))
elif module == "fairseq_kd.scoring" and args[0] == "table":
    names = [args[i + 1].split("=")[0] for i, a in enumerate(args) if a == "--system"]
    write(opt("--markdown"), ["| system | BLEU | chrF |", "|---|---:|---:|"] + [f"| {n} | 1.00 | 2.00 |" for n in names])
else:
    sys.stderr.write(f"fake python: unexpected call {argv}\n")
    sys.exit(3)
'''

FAKE_ITERATE = r'''
import json, os
keys = ["DATA", "UNLABELED", "SPM_MODEL", "TEACHER", "VALID_REF", "WORK", "SRC", "TGT", "ROUNDS",
        "UPDATES_PER_ROUND", "ARCH_ARGS", "TRAIN_ARGS", "LABEL_BEAM", "VALID_BEAM", "ON_DEGENERATE", "CPU",
        "LABEL_CHUNK", "LABEL_WORKERS", "LABEL_GPUS"]
with open(os.environ["FAKE_ITERATE_LOG"], "a") as f:
    f.write(json.dumps({k: os.environ.get(k) for k in keys}) + "\n")
'''


class FakePython:
    def __init__(self, root, gpus=0):
        root = str(root)
        self.log = os.path.join(root, "python.log")
        self.iterate_log = os.path.join(root, "iterate.log")
        python = write_tool(os.path.join(root, "bin"), "python", FAKE_PYTHON)
        iterate = os.path.join(root, "iterate.sh")
        with open(iterate, "w") as f:
            f.write(f"#!/usr/bin/env bash\nexec {sys.executable} - <<'EOF'\n{FAKE_ITERATE}\nEOF\n")
        self.env = dict(os.environ, PYTHON=python, FAKE_PYTHON_LOG=self.log, FAKE_GPUS=str(gpus),
                        ITERATE_SH=iterate, FAKE_ITERATE_LOG=self.iterate_log)
        for name in ("TRAIN_LINES", "VALID_LINES", "TEST_LINES", "VOCAB", "TEACHER_UPDATES", "STUDENT_UPDATES",
                     "TRAIN_BEAM", "TEST_BEAM", "DECODE_SHARDS", "OMP_NUM_THREADS"):
            self.env.pop(name, None)

    def calls(self, module=None, sub=None):
        if not os.path.exists(self.log):
            return []
        entries = [json.loads(line) for line in read(self.log)]
        return [e for e in entries if module is None or (e["argv"][:2] == ["-m", module]
                and (sub is None or e["argv"][2] == sub))]

    def iterate_calls(self):
        return [json.loads(line) for line in read(self.iterate_log)] if os.path.exists(self.iterate_log) else []


def flags(argv):
    """``{--flag: value or True}`` of a command line (positional arguments left out)."""
    out, i = {}, 0
    while i < len(argv):
        if argv[i].startswith("--"):
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                out[argv[i]] = argv[i + 1]
                i += 2
                continue
            out[argv[i]] = True
        i += 1
    return out


def train_flags(fake, name):
    calls = [c for c in fake.calls("fairseq_cli.train") if flags(c["argv"])["--save-dir"].endswith("/" + name)]
    assert len(calls) == 1, [c["argv"] for c in fake.calls("fairseq_cli.train")]
    return flags(calls[0]["argv"])


def test_wmt_run_full_scale_wires_the_paper_settings(tmp_path):
    fake = FakePython(tmp_path / "fake", gpus=1)
    work, data_root = tmp_path / "work", tmp_path / "corpora"
    manifest = tmp_path / "pins.sha256"
    manifest.write_text("0" * 64 + "  training-parallel-europarl-v7.tgz\n")
    unlabeled = tmp_path / "news.en"
    unlabeled.write_text("a source sentence\n")
    args = ["--pair", "en-de", "--scale", "full", "--students", "baseline seq_kd tie_kd", "--work", work,
            "--data-root", data_root, "--checksums", manifest, "--rounds", "2", "--unlabeled", unlabeled]
    proc = run_recipe(WMT_RUN, args, fake.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = started(proc.stdout)
    assert stages == [
        "prepare_wmt", "prepare", "teacher", "translate_teacher",
        "student_baseline", "average_student_baseline", "translate_student_baseline",
        "decode_train_with_teacher", "student_seq_kd", "average_student_seq_kd", "translate_student_seq_kd",
        "student_tie_kd", "average_student_tie_kd", "translate_student_tie_kd", "score", "iterate",
    ]

    (wmt,) = fake.calls("fairseq_kd.wmt", "prepare")
    assert flags(wmt["argv"]) == {"--pair": "en-de", "--out": str(data_root / "wmt14_en_de"), "--checksums": str(manifest)}
    (prep,) = fake.calls("fairseq_kd.prepare")
    p = flags(prep["argv"])
    assert p["--corpus"] == "wmt14_en_de" and p["--data-root"] == str(data_root) and p["--vocab-size"] == "32000"
    assert "--train-lines" not in p and "--test-from-valid" not in p

    common = {"--share-all-embeddings": True, "--optimizer": "adam", "--adam-betas": "(0.9,0.98)",
              "--lr-scheduler": "inverse_sqrt", "--warmup-updates": "4000", "--warmup-init-lr": "1e-07",
              "--clip-norm": "5.0", "--weight-decay": "0.0", "--max-tokens": "4096", "--update-freq": "8",
              "--save-interval-updates": "5000", "--keep-interval-updates": "5", "--fp16": True}
    teacher = train_flags(fake, "teacher")
    assert teacher.items() >= {**common, "--arch": "transformer_vaswani_wmt_en_de_big", "--dropout": "0.3",
                               "--attention-dropout": "0.1", "--activation-dropout": "0.1", "--lr": "5e-4",
                               "--max-update": "300000", "--criterion": "label_smoothed_cross_entropy",
                               "--label-smoothing": "0.1", "--eval-bleu": True,
                               "--eval-bleu-args": '{"beam":4,"lenpen":0.6}', "--best-checkpoint-metric": "bleu",
                               "--maximize-best-checkpoint-metric": True}.items()
    assert "--cpu" not in teacher
    student = {**common, "--arch": "transformer", "--dropout": "0.1", "--lr": "7e-4", "--max-update": "200000"}
    assert train_flags(fake, "student_baseline").items() >= {**student, "--criterion": "label_smoothed_cross_entropy"}.items()
    tie = train_flags(fake, "student_tie_kd")
    assert tie.items() >= {**student, "--task": "distillation_translation", "--criterion": "tie_kd",
                           "--kd-alpha": "0.5", "--tie-topk": "5", "--tie-iterations": "3",
                           "--teacher-path": str(work / "teacher" / "checkpoint_best.pt"),
                           "--ddp-backend": "legacy_ddp"}.items()
    assert "--teacher-precision" not in tie  # the teacher runs in fp32 unless asked
    assert train_flags(fake, "student_seq_kd")["--teacher-target-subset"] == "train_teacher"

    decodes = [flags(c["argv"]) for c in fake.calls("fairseq_kd.decoding", "decode")]
    # a work queue of 20k-sentence chunks, one worker per GPU (here one) waiting for every chunk; fp32 teacher,
    # fairseq's default length cap; degenerate translations dropped at full scale
    assert [(d["--chunk-size"], d["--worker-id"], d["--wait"]) for d in decodes] == [("20000", "node0.0", True)]
    assert all(d["--beam"] == "5" and "--shard-id" not in d and "--teacher-precision" not in d
               and "--max-len-a" not in d and "--max-len-b" not in d for d in decodes)
    (merge,) = fake.calls("fairseq_kd.decoding", "merge")
    assert flags(merge["argv"])["--on-degenerate"] == "drop"
    averages = [flags(c["argv"]) for c in fake.calls("fairseq_kd.wmt", "average")]
    assert [(a["--dir"], a["--last"], a["--upper-bound"]) for a in averages] == [
        (str(work / f"student_{s}"), "5", "200000") for s in ("baseline", "seq_kd", "tie_kd")]
    generates = [flags(c["argv"]) for c in fake.calls("fairseq_cli.generate")]
    assert [g["--path"] for g in generates] == [str(work / "teacher" / "checkpoint_best.pt")] + [
        str(work / f"student_{s}" / "checkpoint_avg.pt") for s in ("baseline", "seq_kd", "tie_kd")]
    assert all(g["--beam"] == "4" and g["--lenpen"] == "0.6" and "--cpu" not in g and "--max-len-a" not in g
               for g in generates)
    assert read(work / "results.md")[2:] == [f"| {n} | 1.00 | 2.00 |" for n in
                                             ("teacher", "student baseline", "student seq_kd", "student tie_kd")]

    (it,) = fake.iterate_calls()
    assert it["ROUNDS"] == "2" and it["UNLABELED"] == str(unlabeled) and it["CPU"] == "0"
    assert it["TEACHER"] == str(work / "teacher" / "checkpoint_best.pt") and it["DATA"] == str(work / "data" / "bin")
    assert it["SPM_MODEL"] == str(work / "data" / "spm.model") and it["VALID_REF"] == str(work / "data" / "raw" / "valid.de")
    assert it["UPDATES_PER_ROUND"] == "200000" and it["ON_DEGENERATE"] == "drop" and it["WORK"] == str(work / "iterate")
    assert "--arch transformer " in it["ARCH_ARGS"] and "--lr 7e-4" in it["ARCH_ARGS"] and "\n" not in it["ARCH_ARGS"]
    assert "--fp16" in it["TRAIN_ARGS"] and "--update-freq 8" in it["TRAIN_ARGS"]
    assert "--ddp-backend legacy_ddp" in it["TRAIN_ARGS"]
    # the labels: the teacher decoding's work queue, one worker per GPU (here one)
    assert (it["LABEL_CHUNK"], it["LABEL_WORKERS"], it["LABEL_GPUS"]) == ("20000", "1", "0")

    # a re-run skips every stage; iterate.sh (its own per-round state) is called again to resume or add rounds
    n_calls = len(fake.calls())
    proc = run_recipe(WMT_RUN, args, fake.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert skipped(proc.stdout) == stages[1:-1]
    assert started(proc.stdout) == ["prepare_wmt", "iterate"]
    new = [c["argv"] for c in fake.calls()[n_calls:]]
    # only prepare-wmt (skips its finished steps itself, verifies the pins again); the table is up to date
    assert [a[:3] for a in new if a[0] == "-m"] == [["-m", "fairseq_kd.wmt", "prepare"]]
    assert len(fake.iterate_calls()) == 2


def test_wmt_run_cpu_scale_presets_per_pair(tmp_path):
    """--scale cpu: the local corpus of each pair; en-de holds 1000 valid lines out as its test set."""
    fake = FakePython(tmp_path / "fake")
    for pair, corpus in (("en-de", "opennmt_toy_en_de"), ("en-fr", "multi30k_en_fr"), ("en-ro", "tatoeba_en_ro")):
        work = tmp_path / pair
        proc = run_recipe(WMT_RUN, ["--pair", pair, "--scale", "cpu", "--work", work, "--data-root", DATA], fake.env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        prep = flags(fake.calls("fairseq_kd.prepare")[-1]["argv"])
        assert prep["--corpus"] == corpus and prep["--tgt"] == pair[3:]
        assert prep.get("--test-from-valid") == ("1000" if pair == "en-de" else None)
        assert prep.get("--train-lines") == ("10000" if pair == "en-fr" else None)
        teacher = train_flags(fake, f"{pair}/teacher")
        assert teacher["--cpu"] is True and teacher["--encoder-layers"] == "2" and teacher["--max-update"] == "600"
        assert re.findall(r"^\| (.*?) \|", (work / "results.md").read_text(), flags=re.M)[1:] == [
            "teacher", "student baseline", "student word_kd", "student seq_kd", "student tie_kd",
            "student self_evolution_kd", "student hybrid_gated_kd"]
        decode = [c for c in fake.calls("fairseq_kd.decoding", "decode") if str(work) in c["argv"][c["argv"].index("--out-dir") + 1]]
        assert len(decode) == 2 and all(c["omp"] == "1" for c in decode)


def test_wmt_run_rounds_at_cpu_scale_default_to_the_training_source(tmp_path):
    fake = FakePython(tmp_path / "fake")
    work = tmp_path / "work"
    proc = run_recipe(WMT_RUN, ["--pair", "en-ro", "--scale", "cpu", "--students", "baseline", "--work", work,
                                "--rounds", "1"], fake.env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (it,) = fake.iterate_calls()
    assert it["UNLABELED"] == str(work / "data" / "raw" / "train.en") and it["CPU"] == "1"
    assert it["ON_DEGENERATE"] == "keep" and it["ROUNDS"] == "1" and it["UPDATES_PER_ROUND"] == "300"


@pytest.mark.parametrize("args, message", [
    ([], "--pair is required"),
    (["--pair", "en-xx", "--scale", "cpu"], "--pair must be en-de, en-fr, en-ro or de-en, got en-xx"),
    (["--pair", "en-de"], "--scale is required"),
    (["--pair", "en-de", "--scale", "gpu"], "--scale must be cpu or full, got gpu"),
    (["--pair", "en-de", "--scale", "cpu", "--checksums", "x"], "--checksums is for the WMT downloads of --scale full"),
    (["--pair", "en-de", "--scale", "full", "--rounds", "2"], "--rounds at --scale full needs --unlabeled FILE"),
    (["--pair", "en-de", "--scale", "cpu", "--students", "baseline nope"], "unknown student nope"),
    (["--pair", "en-de", "--scale", "cpu", "--data-root", "/nonexistent"], "/nonexistent/opennmt_toy_en_de not found"),
    (["--pair", "en-de", "--scale", "cpu", "--rounds"], "--rounds needs a value"),
    (["--pair", "en-de", "--scale", "cpu", "--size"], "unknown argument --size"),
])
def test_wmt_run_input_errors_are_one_line(tmp_path, args, message):
    fake = FakePython(tmp_path / "fake")
    proc = run_recipe(WMT_RUN, ["--work", tmp_path / "w", *args], fake.env)
    assert proc.returncode in (1, 2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.sh: error: ") and message in lines[0], proc.stderr
    assert not fake.calls("fairseq_cli.train")


def test_prepare_wmt_refuses_a_corrupted_archive(en_ro_world, tmp_path):
    """A truncated download (no pins given) is refused when read, with the file and the fix; nothing is built."""
    world = en_ro_world
    with open(world.ep_archive, "rb") as f:
        payload = f.read()
    with open(world.ep_archive, "wb") as f:
        f.write(payload[: len(payload) // 2])
    out = tmp_path / "corrupt"
    line = error_line(world.prepare("--pair", "en-ro", "--out", out))
    archive = str(out / "orig" / "training-parallel-ep-v8.tgz")
    assert f"cannot read {archive}" in line and "move it aside and re-run" in line
    assert not (out / "train.en").exists() and not (out / "train.ro").exists()
    # pinned to the good archive's hash: the corrupted download is refused before it is even opened
    good = tmp_path / "good.tgz"
    good.write_bytes(payload)
    pins = tmp_path / "pins.sha256"
    pins.write_text(f"{sha256(good)}  training-parallel-ep-v8.tgz\n{sha256(world.st_archive)}  SETIMES2.en-ro.txt.zip\n")
    os.remove(archive)
    line = error_line(world.prepare("--pair", "en-ro", "--out", out, "--checksums", pins))
    assert "training-parallel-ep-v8.tgz" in line and sha256(good) in line and sha256(world.ep_archive) in line


# ---- paper-comparable scores ------------------------------------------------------------------------------


def test_tokenized_and_compound_split_bleu_match_hand_computed_values(tmp_path):
    from fairseq_kd import scoring_tok

    # Moses tokens: "Das ist ein gut-gemeinter Rat ." vs "... Vorschlag ." (6 tokens each, brevity 1)
    # p1..p4 = 5/6, 3/5, 2/4, 1/3 -> BLEU = (1/12) ** (1/4)
    hyp, ref = ["Das ist ein gut-gemeinter Rat."], ["Das ist ein gut-gemeinter Vorschlag."]
    assert scoring_tok.moses_tokenize(hyp, "de") == ["Das ist ein gut-gemeinter Rat ."]
    assert scoring_tok.tokenized_bleu(hyp, ref, "de") == pytest.approx(100 * (1 / 12) ** 0.25)
    # compound split (tokenizer.perl -a, then the rule): "gut @ ##AT##-##AT## @ gemeinter" -> 10 tokens;
    # p = 9/10, 7/9, 6/8, 5/7 -> 0.375 ** (1/4)
    assert scoring_tok.tokenized_bleu(hyp, ref, "de", compound_split=True) == pytest.approx(100 * 0.375 ** 0.25)
    # fairseq's perl rule, s{(\S)-(\S)}{$1 ##AT##-##AT## $2}g: a match consumes its right character
    assert scoring_tok.split_compounds("a-b-c x-y - z") == "a ##AT##-##AT## b-c x ##AT##-##AT## y - z"
    # multi-bleu: no smoothing, a missing 4-gram match is BLEU 0; two sentences pooled at corpus level
    assert scoring_tok.tokenized_bleu(["Hello, world!"], ["Hello, world."], "en") == 0.0
    two_h = ["a b c d e", "the cat sat on the mat"]
    two_r = ["a b c d f", "the cat sat on the mat"]
    # p1 = (4+6)/11, p2 = (3+5)/9, p3 = (2+4)/7, p4 = (1+3)/5
    expected = 100 * ((10 / 11) * (8 / 9) * (6 / 7) * (4 / 5)) ** 0.25
    assert scoring_tok.tokenized_bleu(two_h, two_r, "en") == pytest.approx(expected)

    # the table labels each score; COMET without the package is skipped with a message
    ref_file, hyp_file = tmp_path / "ref.de", tmp_path / "hyp.de"
    ref_file.write_text("\n".join(ref) + "\n")
    hyp_file.write_text("\n".join(hyp) + "\n")
    src_file = tmp_path / "src.en"
    src_file.write_text("That is well-meant advice.\n")
    proc = cli.run("fairseq_kd.scoring", ["table", "--ref", ref_file, "--system", f"sys={hyp_file}", "--lang", "de",
                                          "--tokenized", "--compound-split", "--comet-model", tmp_path / "none.ckpt",
                                          "--src", src_file, "--markdown", tmp_path / "t.md"])
    table = (tmp_path / "t.md").read_text()
    assert "| system | BLEU | chrF | tok. BLEU | comp.-split BLEU |" in table
    assert f"| {100 * (1 / 12) ** 0.25:.2f} | {100 * 0.375 ** 0.25:.2f} |" in table
    assert "multi-bleu.perl" in table and "compound_split_bleu.sh" in table
    assert "COMET: skipped, unbabel-comet is not installed" in table and "COMET skipped" in proc.stdout


def test_extract_detokenizes_moses_output(tmp_path):
    gen = tmp_path / "gen.out"
    gen.write_text("D-1\t-0.1\tEr sagte &quot; ja &quot; .\nD-0\t-0.2\tDas ist gut-gemeint , oder ?\n")
    cli.run("fairseq_kd.scoring", ["extract", gen, tmp_path / "hyp", "--expect-lines", "2", "--detokenize", "de"])
    assert read(tmp_path / "hyp") == ["Das ist gut-gemeint, oder?", 'Er sagte "ja".']


# ---- Moses + BPE and a fairseq model folder as the teacher ---------------------------------------------


@pytest.mark.e2e
def test_moses_bpe_path_and_teacher_dir_end_to_end(tmp_path):
    """A tiny teacher trained on the data of the Moses + BPE path, saved in the layout of fairseq's published models
    (model.pt, dict.en.txt, dict.ro.txt, bpecodes), then used through --teacher-dir: the students' data are
    binarized with its BPE codes and dictionaries, so the live teacher's dictionary check passes."""
    from fairseq_kd.prepare_bpe import prepare_bpe

    first = tmp_path / "first"
    bin_dir = prepare_bpe("tatoeba_en_ro", DATA, "en", "ro", str(first), train_lines=300, valid_lines=30,
                          test_lines=30, merges=400)
    codes = read(first / "bpecodes")
    assert len(codes) == 401 and codes[0].startswith("#version")  # 400 merges and subword-nmt's header
    bpe_train = read(first / "bpe_text" / "train.ro")
    assert any("@@ " in line for line in bpe_train)
    raw_train = read(first / "raw" / "train.ro")
    assert len(raw_train) == len(bpe_train) == len(read(first / "raw" / "train.en"))
    assert len(raw_train) <= 300  # the length filter after BPE keeps the raw text aligned
    assert read(first / "raw" / "test.ro") == shared_lines("tatoeba_en_ro", "test.ro")[:30]
    cli.train(bin_dir, first / "teacher", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
              "--max-update", "4")
    env = dict(os.environ, OMP_NUM_THREADS="1", TRAIN_LINES="300", VALID_LINES="30", TEST_LINES="30",
               STUDENT_UPDATES="3", TEST_BEAM="1")

    published = tmp_path / "ro-teacher"  # fairseq's published layout
    published.mkdir()
    import shutil

    shutil.copyfile(first / "teacher" / "checkpoint_best.pt", published / "model.pt")
    for name in ("dict.en.txt", "dict.ro.txt"):
        shutil.copyfile(first / "bin" / name, published / name)
    shutil.copyfile(first / "bpecodes", published / "bpecodes")
    shutil.rmtree(first)  # the teacher's own data directory is gone, as with a download

    second = tmp_path / "second"
    proc = run_recipe(WMT_RUN, ["--pair", "en-ro", "--scale", "cpu", "--students", "word_kd", "--work", second,
                                "--teacher-dir", published], env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert started(proc.stdout) == ["prepare", "translate_teacher", "student_word_kd", "translate_student_word_kd", "score"]
    for name in ("dict.en.txt", "dict.ro.txt"):
        assert read(second / "data" / "bin" / name) == read(published / name)
    assert read(second / "data" / "bpecodes") == read(published / "bpecodes")
    assert read(second / "data" / "bpe_text" / "train.ro") == bpe_train  # the same segmentation
    hyps = read(second / "teacher.test.hyp")  # Moses-detokenized, BPE removed
    assert len(hyps) == 30 and not any("@@" in h or "&apos;" in h or "&quot;" in h for h in hyps)
    table = (second / "results.md").read_text()
    assert "| system | BLEU | chrF | tok. BLEU |" in table and "comp.-split" not in table  # no compounds for en-ro
    log = (second / "student_word_kd.train.log").read_text()
    assert "done training" in log and str(published / "model.pt") in log
    assert len(read(second / "student_word_kd.test.hyp")) == 30
