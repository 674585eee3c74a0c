"""The CTranslate2 conversion of a teacher is done once per checkpoint, under a lock, into a folder of the
caller's choice (``decode --ct2-dir``): two decoders started together convert once, the other waits and
reuses it; a read-only checkpoint folder is left untouched."""

import json
import os
import shutil
import stat
import subprocess

import pytest

from tests import cli

pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install 'fairseq-kd[ct2]')")


def test_two_decoders_convert_once_into_the_work_folder(prepared, teacher_ckpt, tmp_path):
    folder = tmp_path / "published"
    folder.mkdir()
    ckpt = folder / "checkpoint_last.pt"
    shutil.copy(teacher_ckpt, ckpt)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)  # read-only, as a shared model folder
    ct2_dir = tmp_path / "work" / "ct2"
    procs = []
    for name in ("a", "b"):
        cmd = [cli.python(), "-m", "fairseq_kd.decoding", "decode", "--data", prepared.bin, "--split", "test",
               "--path", str(ckpt), "--out-dir", str(tmp_path / name), "--beam", "2", "--max-len-a", "1.2",
               "--max-len-b", "10", "--cpu", "--batch-size", "16", "--no-progress-bar",
               "--backend", "ctranslate2", "--ct2-compute-type", "float32", "--ct2-dir", str(ct2_dir)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cli.REPO,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")))
    outputs = [p.communicate(timeout=600) for p in procs]
    folder.chmod(stat.S_IRWXU)
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    logs = "".join(err for _, err in outputs)
    assert logs.count("converted ") == 1 and logs.count(" found: ") == 1, logs[-3000:]  # one converts, one reuses
    (converted,) = os.listdir(ct2_dir)
    assert converted.startswith("checkpoint_last.pt.ct2-") and os.listdir(folder) == ["checkpoint_last.pt"]
    with open(ct2_dir / converted / "fairseq_kd_source.json", encoding="utf-8") as f:
        assert json.load(f)["checkpoint"] == str(ckpt)
    # both decodes complete and identical (one model)
    texts = []
    for name in ("a", "b"):
        (shard,) = [n for n in os.listdir(tmp_path / name) if n.endswith(".jsonl")]
        with open(tmp_path / name / shard, encoding="utf-8") as f:
            texts.append([json.loads(line)["hyps"][0]["text"] for line in f])
    assert texts[0] == texts[1] and len(texts[0]) == 50
