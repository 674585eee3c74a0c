"""The WMT corpora of the distillation papers, built from their official sources.

::

    python -m fairseq_kd.wmt prepare --pair en-de --out corpora/wmt14_en_de [--checksums FILE]
    python -m fairseq_kd.wmt average --dir student/ --last 5 --upper-bound 200000 --output avg.pt

``prepare`` writes a corpus folder ``OUT/{train,valid,test}.{src,tgt}`` (raw,
untokenized text: :mod:`fairseq_kd.prepare` learns SentencePiece on it later):

* **en-de**, WMT'14: Europarl v7, Common Crawl, News Commentary v9; valid
  newstest2013, test newstest2014 (the 3003-sentence "full" set);
* **en-fr**, WMT'14: Europarl v7, Common Crawl, UN, News Commentary v9, Giga
  French-English; valid newstest2013, test newstest2014 (full);
* **en-ro**, WMT'16: Europarl v8, SETIMES2; valid newsdev2016, test newstest2016.

The training archives are the ones fairseq's ``examples/translation``
scripts download (``prepare-wmt14en2{de,fr}.sh``; for En-Ro the WMT'16 task
page's Europarl v8 and OPUS' SETIMES2).  Each archive is fetched with
``DOWNLOAD`` (a curl- or wget-compatible command, ``curl`` by default) into
``ORIG/NAME.part`` (resumed if interrupted), hashed and renamed to
``ORIG/NAME``; an archive already there is not downloaded again.  With
``--checksums FILE`` (``sha256sum`` format: ``HEX  NAME`` per line) every
archive must match its pinned sha256.  The observed sha256 of every archive is
written to ``OUT/checksums.observed`` in the same format, ready to be pinned.
The valid and test sets come from sacrebleu's own downloader (``SACREBLEU``,
``sacrebleu`` by default: ``sacrebleu -t wmt14/full -l en-de --echo src``),
which verifies its md5 checksums.

Training pairs are cleaned like Moses' ``clean-corpus-n.perl`` (``-ratio 1.5``,
1 to 250 tokens) on whitespace-separated words: a pair is dropped when a side is
empty, longer than ``--max-words`` words, or when the word-count ratio exceeds
``--max-ratio``.  Carriage returns and other characters that some readers take
for line breaks are replaced by spaces; nothing else is changed.  Every file is
written under a temporary name and renamed when complete, and the line counts
of source and target (and of the test sets, against their published sizes) are
asserted.

``average`` averages the parameters of the last N interval checkpoints
(``checkpoint_<epoch>_<update>.pt``) of a save directory, like fairseq's
``scripts/average_checkpoints.py --num-update-checkpoints N
--checkpoint-upper-bound U`` (which the pip package does not ship); the
TIE-KD recipe evaluates students that way.
"""

import argparse
import hashlib
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from tqdm import tqdm

from fairseq_kd.errors import DistillationError
from fairseq_kd.textio import count_lines

PROG = "prepare-wmt"


@dataclass(frozen=True)
class Archive:
    name: str  # file name under ORIG (also the name in the checksum manifest)
    url: str


@dataclass(frozen=True)
class Bitext:
    """One training corpus: archive members ``PREFIX.<lang>`` (``+ .gz`` when ``gz``)."""

    archive: str
    prefix: str
    gz: bool = False

    def member(self, lang: str) -> str:
        return f"{self.prefix}.{lang}" + (".gz" if self.gz else "")


@dataclass(frozen=True)
class TestSet:
    """A sacrebleu test set: ``sacrebleu -t NAME -l SRC-TGT --echo src|ref``."""

    sacrebleu: str
    label: str
    lines: int


@dataclass(frozen=True)
class Pair:
    corpus: str  # the corpus folder name run.sh looks for under --data-root
    src: str
    tgt: str
    archives: Tuple[Archive, ...]
    bitexts: Tuple[Bitext, ...]
    valid: TestSet
    test: TestSet


EUROPARL_V7 = Archive("training-parallel-europarl-v7.tgz", "http://statmt.org/wmt13/training-parallel-europarl-v7.tgz")
COMMONCRAWL = Archive("training-parallel-commoncrawl.tgz", "http://statmt.org/wmt13/training-parallel-commoncrawl.tgz")
NEWS_COMMENTARY_V9 = Archive("training-parallel-nc-v9.tgz", "http://statmt.org/wmt14/training-parallel-nc-v9.tgz")
UN = Archive("training-parallel-un.tgz", "http://statmt.org/wmt13/training-parallel-un.tgz")
GIGA_FREN = Archive("training-giga-fren.tar", "http://statmt.org/wmt10/training-giga-fren.tar")
EUROPARL_V8 = Archive(
    "training-parallel-ep-v8.tgz", "http://data.statmt.org/wmt16/translation-task/training-parallel-ep-v8.tgz"
)
SETIMES2 = Archive("SETIMES2.en-ro.txt.zip", "https://object.pouta.csc.fi/OPUS-SETIMES/v2/moses/en-ro.txt.zip")

NEWSTEST2013 = TestSet("wmt13", "newstest2013", 3000)
NEWSTEST2014 = TestSet("wmt14/full", "newstest2014", 3003)

PAIRS: Dict[str, Pair] = {
    "en-de": Pair(
        corpus="wmt14_en_de", src="en", tgt="de",
        archives=(EUROPARL_V7, COMMONCRAWL, NEWS_COMMENTARY_V9),
        bitexts=(
            Bitext(EUROPARL_V7.name, "training/europarl-v7.de-en"),
            Bitext(COMMONCRAWL.name, "commoncrawl.de-en"),
            Bitext(NEWS_COMMENTARY_V9.name, "training/news-commentary-v9.de-en"),
        ),
        valid=NEWSTEST2013, test=NEWSTEST2014,
    ),
    "en-fr": Pair(
        corpus="wmt14_en_fr", src="en", tgt="fr",
        archives=(EUROPARL_V7, COMMONCRAWL, UN, NEWS_COMMENTARY_V9, GIGA_FREN),
        bitexts=(
            Bitext(EUROPARL_V7.name, "training/europarl-v7.fr-en"),
            Bitext(COMMONCRAWL.name, "commoncrawl.fr-en"),
            Bitext(UN.name, "un/undoc.2000.fr-en"),
            Bitext(NEWS_COMMENTARY_V9.name, "training/news-commentary-v9.fr-en"),
            Bitext(GIGA_FREN.name, "giga-fren.release2.fixed", gz=True),
        ),
        valid=NEWSTEST2013, test=NEWSTEST2014,
    ),
    "en-ro": Pair(
        corpus="wmt16_en_ro", src="en", tgt="ro",
        archives=(EUROPARL_V8, SETIMES2),
        bitexts=(
            Bitext(EUROPARL_V8.name, "training-parallel-ep-v8/europarl-v8.ro-en"),
            Bitext(SETIMES2.name, "SETIMES.en-ro"),
        ),
        valid=TestSet("wmt16/dev", "newsdev2016", 1999),
        test=TestSet("wmt16", "newstest2016", 1999),
    ),
}

# characters that Python's universal-newline readers (and hence SentencePiece's
# and fairseq-preprocess' callers) or str.splitlines() treat as line breaks
_LINE_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def log(message: str) -> None:
    print(f"[{PROG}] {message}", file=sys.stderr, flush=True)


# ---- checksums ---------------------------------------------------------------------------------


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, desc=f"sha256 {os.path.basename(path)}",
        leave=False, disable=size < (64 << 20),
    ) as bar:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def read_manifest(path: str) -> Dict[str, str]:
    """``{archive name: sha256}`` from a ``sha256sum``-style file (``HEX  NAME``; ``#`` comments)."""
    if not os.path.isfile(path):
        raise DistillationError(f"checksum manifest {path} not found; pass a file of 'SHA256  ARCHIVE' lines")
    pins = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", fields[0]):
                raise DistillationError(
                    f"{path} line {number}: expected 'SHA256  ARCHIVE' (as written by sha256sum), got {line!r}"
                )
            pins[os.path.basename(fields[1].lstrip("*"))] = fields[0].lower()
    return pins


def write_manifest(path: str, digests: Dict[str, str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for name in sorted(digests):
            f.write(f"{digests[name]}  {name}\n")
    os.replace(tmp, path)


# ---- download ----------------------------------------------------------------------------------


def download_command(download: str, url: str, dest: str) -> List[str]:
    """The argv that fetches ``url`` into ``dest`` with a curl- or wget-compatible ``download``."""
    cmd = shlex.split(download)
    if not cmd:
        raise DistillationError("DOWNLOAD is empty; set it to curl or wget (or unset it)")
    if os.path.basename(cmd[0]).startswith("wget"):
        return cmd + ["--continue", "--tries=3", "-O", dest, url]
    return cmd + ["--fail", "--location", "--retry", "3", "--continue-at", "-", "--output", dest, url]


def fetch_archive(archive: Archive, orig: str, download: str, pins: Optional[Dict[str, str]],
                  manifest: Optional[str]) -> str:
    """``ORIG/NAME``, downloaded unless present; returns its sha256 (verified against ``pins``)."""
    dest = os.path.join(orig, archive.name)
    sidecar = dest + ".sha256"
    pinned = None
    if pins is not None:
        pinned = pins.get(archive.name)
        if pinned is None:
            raise DistillationError(
                f"{manifest} has no sha256 for {archive.name}; add a line '<sha256>  {archive.name}' "
                f"(a run without --checksums writes the observed ones to OUT/checksums.observed)"
            )
    if os.path.exists(dest):
        if pinned is None and os.path.exists(sidecar):
            with open(sidecar, encoding="utf-8") as f:
                digest = f.read().strip()
        else:
            digest = sha256_of(dest)
        if pinned is not None and digest != pinned:
            raise DistillationError(
                f"{dest} has sha256 {digest} but {manifest} pins {pinned}; "
                f"delete {dest} to download it again, or correct the pin in {manifest}"
            )
        log(f"{archive.name}: downloaded before, skipped")
    else:
        part = dest + ".part"
        cmd = download_command(download, archive.url, part)
        log(f"{archive.name}: downloading {archive.url}")
        try:
            status = subprocess.run(cmd).returncode
        except FileNotFoundError:
            raise DistillationError(
                f"download command {cmd[0]!r} not found; install curl or set DOWNLOAD to a curl- or wget-compatible command"
            )
        if status != 0 or not os.path.exists(part):
            raise DistillationError(
                f"downloading {archive.url} into {part} failed ({cmd[0]} exit status {status}); "
                f"check the network and re-run (a partial download is resumed; delete {part} to start over)"
            )
        digest = sha256_of(part)
        if pinned is not None and digest != pinned:
            os.remove(part)
            raise DistillationError(
                f"{dest}: the download from {archive.url} has sha256 {digest} but {manifest} pins {pinned}; "
                f"it was deleted: re-run to fetch it again, or correct the pin in {manifest} if the file changed upstream"
            )
        os.replace(part, dest)
    with open(sidecar + ".tmp", "w", encoding="utf-8") as f:
        f.write(digest + "\n")
    os.replace(sidecar + ".tmp", sidecar)
    return digest


# ---- extraction --------------------------------------------------------------------------------


def _normalize(member: str) -> str:
    while member.startswith("./"):
        member = member[2:]
    return member


def _match(member: str, wanted: Sequence[str]) -> Optional[str]:
    """The entry of ``wanted`` that ``member`` is (also under another top folder), or None."""
    norm = _normalize(member)
    for w in wanted:
        if norm == w or norm.endswith("/" + w):
            return w
    return None


def extract_members(archive_path: str, wanted: Sequence[str], dest_dir: str) -> None:
    """Extract the ``wanted`` members of a .tgz/.tar/.zip to ``dest_dir/<wanted>``.

    A member matches when its path is ``wanted`` or ends with ``/wanted``; a
    .tgz is read in one streaming pass.  Members are extracted into
    ``dest_dir.tmp`` and renamed into place one by one, so a file in
    ``dest_dir`` is complete, and only missing ones are extracted (pairs that
    share an archive, e.g. Europarl v7 for en-de and en-fr, add their members).
    """
    missing = [w for w in wanted if not os.path.exists(os.path.join(dest_dir, w))]
    if not missing:
        return
    tmp = dest_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    log(f"{os.path.basename(archive_path)}: extracting {', '.join(missing)}")
    found: Dict[str, List[str]] = {w: [] for w in missing}
    try:
        if zipfile.is_zipfile(archive_path):
            with zipfile.ZipFile(archive_path) as z:
                for name in z.namelist():
                    w = _match(name, missing)
                    if w is not None and not name.endswith("/"):
                        found[w].append(name)
                        _copy_stream(z.open(name), os.path.join(tmp, w))
        else:
            with tarfile.open(archive_path, mode="r|*") as t:
                for member in t:
                    w = _match(member.name, missing) if member.isfile() else None
                    if w is not None:
                        found[w].append(member.name)
                        _copy_stream(t.extractfile(member), os.path.join(tmp, w))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DistillationError(f"cannot read {archive_path} ({e}); delete it and re-run to download it again")
    for w, names in found.items():
        if len(names) != 1:
            shutil.rmtree(tmp, ignore_errors=True)
            what = "no member" if not names else f"{len(names)} members ({', '.join(names)}) for"
            raise DistillationError(
                f"{archive_path} has {what} {w}; it is damaged or not the expected release: delete it and re-run"
            )
    for w in missing:
        os.makedirs(os.path.dirname(os.path.join(dest_dir, w)), exist_ok=True)
        os.replace(os.path.join(tmp, w), os.path.join(dest_dir, w))
    shutil.rmtree(tmp, ignore_errors=True)


def _copy_stream(source, dest: str) -> None:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with source, open(dest, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)


# ---- text --------------------------------------------------------------------------------------


def raw_lines(path: str) -> Iterator[str]:
    """Lines split on ``\\n`` only (gunzipped when ``.gz``), decoded as UTF-8 (bad bytes replaced)."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for line in f:
            yield line.rstrip(b"\n").decode("utf-8", errors="replace")


def clean_line(line: str) -> str:
    return _LINE_BREAKS.sub(" ", line).strip()


def keep_pair(src: str, tgt: str, max_words: int, max_ratio: float) -> bool:
    ns, nt = len(src.split()), len(tgt.split())
    if ns == 0 or nt == 0 or ns > max_words or nt > max_words:
        return False
    return max(ns, nt) / min(ns, nt) <= max_ratio


def build_train(pair: Pair, extracted: Dict[str, str], out: str, max_words: int, max_ratio: float) -> Dict[str, Tuple[int, int]]:
    """Concatenate and clean the training corpora into ``OUT/train.{src,tgt}``; returns ``{corpus: (read, kept)}``."""
    dest = {lang: os.path.join(out, f"train.{lang}") for lang in (pair.src, pair.tgt)}
    stats: Dict[str, Tuple[int, int]] = {}
    if all(os.path.exists(p) for p in dest.values()):
        log(f"train.{pair.src}, train.{pair.tgt}: built before, skipped")
        return stats
    tmp = {lang: path + ".tmp" for lang, path in dest.items()}
    kept_total = 0
    with open(tmp[pair.src], "w", encoding="utf-8") as fs, open(tmp[pair.tgt], "w", encoding="utf-8") as ft:
        for bitext in pair.bitexts:
            folder = extracted[bitext.archive]
            src_path = os.path.join(folder, bitext.member(pair.src))
            tgt_path = os.path.join(folder, bitext.member(pair.tgt))
            read = kept = 0
            pairs = itertools.zip_longest(raw_lines(src_path), raw_lines(tgt_path))
            for s, t in tqdm(pairs, desc=f"clean {bitext.prefix}", unit=" pairs", leave=False):
                if s is None or t is None:
                    raise DistillationError(
                        f"{src_path} and {tgt_path} differ in length (the {'source' if s is None else 'target'} "
                        f"side ends after {read} lines); the archive {bitext.archive} is damaged or not the "
                        f"expected release: delete it and re-run"
                    )
                read += 1
                s, t = clean_line(s), clean_line(t)
                if keep_pair(s, t, max_words, max_ratio):
                    fs.write(s + "\n")
                    ft.write(t + "\n")
                    kept += 1
            stats[bitext.prefix] = (read, kept)
            kept_total += kept
            log(f"{bitext.prefix}: {kept} of {read} pairs kept")
    for lang in (pair.src, pair.tgt):
        n = count_lines(tmp[lang])
        if n != kept_total:
            raise DistillationError(f"{tmp[lang]} has {n} lines, expected {kept_total}; delete it and re-run")
    for lang in (pair.src, pair.tgt):
        os.replace(tmp[lang], dest[lang])
    return stats


def fetch_test_set(pair: Pair, split: str, test_set: TestSet, out: str, sacrebleu: str) -> None:
    """``OUT/{split}.{src,tgt}`` from ``sacrebleu -t NAME -l SRC-TGT --echo src|ref``."""
    dest = {pair.src: os.path.join(out, f"{split}.{pair.src}"), pair.tgt: os.path.join(out, f"{split}.{pair.tgt}")}
    if all(os.path.exists(p) for p in dest.values()):
        log(f"{split} ({test_set.label}): fetched before, skipped")
        return
    langpair = f"{pair.src}-{pair.tgt}"
    for lang, side in ((pair.src, "src"), (pair.tgt, "ref")):
        cmd = shlex.split(sacrebleu) + ["-t", test_set.sacrebleu, "-l", langpair, "--echo", side]
        tmp = dest[lang] + ".tmp"
        log(f"{split}.{lang}: {test_set.label} from {' '.join(cmd)}")
        try:
            with open(tmp, "wb") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise DistillationError(f"{cmd[0]!r} not found; pip install sacrebleu (or set SACREBLEU)")
        if proc.returncode != 0:
            reason = (proc.stderr.decode("utf-8", "replace").strip().splitlines() or ["no message"])[-1]
            raise DistillationError(
                f"{' '.join(cmd)} failed ({reason}); check the network (sacrebleu caches test sets in ~/.sacrebleu) and re-run"
            )
        n = count_lines(tmp)
        if n != test_set.lines:
            raise DistillationError(
                f"{tmp}: {' '.join(cmd)} gave {n} lines, but {test_set.label} {langpair} has {test_set.lines}; "
                f"remove sacrebleu's cached copy (~/.sacrebleu/{test_set.sacrebleu.split('/')[0]}) and re-run"
            )
    for lang in (pair.src, pair.tgt):
        os.replace(dest[lang] + ".tmp", dest[lang])


def write_readme(pair_name: str, pair: Pair, out: str, orig: str, digests: Dict[str, str],
                 manifest: Optional[str], max_words: int, max_ratio: float) -> None:
    counts = {f"{split}.{lang}": count_lines(os.path.join(out, f"{split}.{lang}"))
              for split in ("train", "valid", "test") for lang in (pair.src, pair.tgt)}
    lines = [
        f"# {pair.corpus}: WMT {pair_name}, raw text built by `python -m fairseq_kd.wmt prepare`",
        "",
        "| archive | url | sha256 (observed) |",
        "|---|---|---|",
        *[f"| {a.name} | {a.url} | {digests[a.name]} |" for a in pair.archives],
        "",
        ("Archive checksums verified against " + manifest) if manifest
        else "Archive checksums NOT verified (no --checksums manifest); pin them with checksums.observed.",
        "",
        "Training corpora, in order: " + ", ".join(f"{b.archive}:{b.member('{' + pair.src + ',' + pair.tgt + '}')}" for b in pair.bitexts),
        f"Cleaning: pairs with an empty side, more than {max_words} words or a word-count ratio over {max_ratio} dropped.",
        f"valid: {pair.valid.label} (sacrebleu -t {pair.valid.sacrebleu}); test: {pair.test.label} (sacrebleu -t {pair.test.sacrebleu}).",
        f"Downloads: {orig}",
        "",
        "| file | lines |",
        "|---|---:|",
        *[f"| {name} | {n} |" for name, n in counts.items()],
    ]
    tmp = os.path.join(out, "README.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(out, "README.md"))


def prepare(pair_name: str, out: str, orig: Optional[str] = None, checksums: Optional[str] = None,
            download: str = "curl", sacrebleu: str = "sacrebleu", max_words: int = 250, max_ratio: float = 1.5) -> str:
    """Build the corpus folder ``out`` for ``pair_name``; returns ``out``."""
    if pair_name not in PAIRS:
        raise DistillationError(f"unknown pair {pair_name!r}; choose one of {', '.join(PAIRS)}")
    pair = PAIRS[pair_name]
    orig = orig or os.path.join(out, "orig")
    os.makedirs(out, exist_ok=True)
    os.makedirs(orig, exist_ok=True)
    pins = read_manifest(checksums) if checksums else None
    digests = {a.name: fetch_archive(a, orig, download, pins, checksums) for a in pair.archives}
    write_manifest(os.path.join(out, "checksums.observed"), digests)
    extracted = {}
    for archive in pair.archives:
        wanted = [b.member(lang) for b in pair.bitexts if b.archive == archive.name for lang in (pair.src, pair.tgt)]
        folder = os.path.join(orig, archive.name + ".d")
        extract_members(os.path.join(orig, archive.name), wanted, folder)
        extracted[archive.name] = folder
    build_train(pair, extracted, out, max_words, max_ratio)
    fetch_test_set(pair, "valid", pair.valid, out, sacrebleu)
    fetch_test_set(pair, "test", pair.test, out, sacrebleu)
    write_readme(pair_name, pair, out, orig, digests, checksums, max_words, max_ratio)
    n = {split: count_lines(os.path.join(out, f"{split}.{pair.src}")) for split in ("train", "valid", "test")}
    log(f"{out}: train {n['train']}, valid {n['valid']}, test {n['test']} pairs; "
        f"archive sha256s in {os.path.join(out, 'checksums.observed')}")
    return out


# ---- checkpoint averaging ----------------------------------------------------------------------


def last_checkpoints(save_dir: str, n: int, upper_bound: Optional[int] = None) -> List[str]:
    """The last ``n`` ``checkpoint_<epoch>_<update>.pt`` of ``save_dir`` by update (at most ``upper_bound``)."""
    if n < 1:
        raise DistillationError(f"--last must be at least 1, got {n}")
    found = []
    for name in os.listdir(save_dir) if os.path.isdir(save_dir) else []:
        m = re.fullmatch(r"checkpoint_\d+_(\d+)\.pt", name)
        if m and (upper_bound is None or int(m.group(1)) <= upper_bound):
            found.append((int(m.group(1)), os.path.join(save_dir, name)))
    found.sort()
    if len(found) < n:
        raise DistillationError(
            f"{save_dir} has {len(found)} interval checkpoints (checkpoint_<epoch>_<update>.pt"
            f"{f' up to update {upper_bound}' if upper_bound else ''}), {n} needed; "
            f"train with --save-interval-updates and --keep-interval-updates {n}"
        )
    return [path for _, path in found[-n:]]


def average_checkpoints(paths: Sequence[str], output: str) -> None:
    """Write the parameter average of ``paths`` to ``output`` (other fields from the last one)."""
    import torch

    from fairseq_kd.checkpoints import install_safe_globals

    install_safe_globals()  # torch.load's weights_only default (torch >= 2.6) then reads fairseq checkpoints
    total = None
    state = None
    for path in tqdm(paths, desc="average", unit="ckpt", leave=False):
        try:
            state = torch.load(path, map_location="cpu")
        except Exception as e:  # a truncated or foreign file: name it instead of a traceback
            raise DistillationError(f"cannot load {path} ({type(e).__name__}: {e}); delete it or train further")
        if not isinstance(state, dict) or "model" not in state:
            raise DistillationError(f"{path} is not a fairseq checkpoint (no 'model' entry)")
        params = state["model"]
        if total is None:
            total = {k: v.detach().double().clone() for k, v in params.items()}
        else:
            if set(params) != set(total):
                raise DistillationError(f"{path} has other parameters than {paths[0]}; average checkpoints of one run")
            for k, v in params.items():
                total[k] += v.double()
    averaged = {}
    for k, v in total.items():
        mean = v / len(paths)
        reference = state["model"][k]
        averaged[k] = mean.to(reference.dtype) if reference.is_floating_point() else reference
    state["model"] = averaged
    tmp = output + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, output)


# ---- command line ------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> None:
    global PROG
    parser = argparse.ArgumentParser(prog="python -m fairseq_kd.wmt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", prog="prepare-wmt", help="download and build a WMT corpus folder")
    pp.add_argument("--pair", required=True, choices=sorted(PAIRS))
    pp.add_argument("--out", required=True, help="corpus folder to write ({train,valid,test}.{src,tgt})")
    pp.add_argument("--orig", default=None, help="where archives are downloaded and extracted (default OUT/orig)")
    pp.add_argument("--checksums", default=None, metavar="FILE",
                    help="sha256 manifest ('HEX  ARCHIVE' lines, e.g. a checksums.observed); every archive must match")
    pp.add_argument("--max-words", type=int, default=250, help="drop training pairs with a side longer than this")
    pp.add_argument("--max-ratio", type=float, default=1.5, help="drop training pairs whose word-count ratio exceeds this")
    av = sub.add_parser("average", help="average the last N interval checkpoints of a run")
    av.add_argument("--dir", required=True, help="save directory with checkpoint_<epoch>_<update>.pt files")
    av.add_argument("--last", type=int, required=True, help="number of checkpoints")
    av.add_argument("--upper-bound", type=int, default=None, help="ignore checkpoints after this update")
    av.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    PROG = "prepare-wmt" if args.command == "prepare" else "average"
    try:
        if args.command == "prepare":
            prepare(
                args.pair, args.out, args.orig, args.checksums,
                download=os.environ.get("DOWNLOAD") or "curl",
                sacrebleu=os.environ.get("SACREBLEU") or "sacrebleu",
                max_words=args.max_words, max_ratio=args.max_ratio,
            )
        else:
            paths = last_checkpoints(args.dir, args.last, args.upper_bound)
            average_checkpoints(paths, args.output)
            print(f"{args.output}: average of {', '.join(os.path.basename(p) for p in paths)}")
    except DistillationError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # disk full, permissions...: the file and the reason, no traceback
        print(f"{PROG}: error: {e.filename or ''}: {e.strerror or e}; fix it and re-run (finished steps are kept)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
