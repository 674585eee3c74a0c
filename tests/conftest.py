"""Session fixtures: a real-data slice prepared like the main job, and a tiny teacher.

The data come from ``../shared/data/multi30k_en_de`` (next to the checkout);
the slice is binarized with a joint SentencePiece vocabulary by
:mod:`fairseq_kd.prepare`, the same code the main job runs.  The teacher is
trained by ``fairseq-train`` with fairseq's own ``label_smoothed_cross_entropy``.
"""

import os
import types

import pytest

from fairseq_kd.checkpoints import install_safe_globals
from tests import cli

# the tests read fairseq checkpoints with torch.load(weights_only=True): the classes they hold, allow-listed
# as the plugin's registration does (importing fairseq_kd does nothing)
install_safe_globals()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    from fairseq_kd.prepare import prepare

    out = str(tmp_path_factory.mktemp("multi30k_slice"))
    bin_dir = prepare(
        "multi30k_en_de", cli.SHARED_DATA, "en", "de", out,
        train_lines=1500, valid_lines=60, test_lines=50, vocab_size=600,
    )
    return types.SimpleNamespace(
        root=out, bin=bin_dir, raw=os.path.join(out, "raw"), spm_text=os.path.join(out, "spm_text"),
        spm_model=os.path.join(out, "spm.model"), src="en", tgt="de",
    )


@pytest.fixture(scope="session")
def teacher_ckpt(prepared, tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp("teacher"))
    cli.train(
        prepared.bin, save_dir, "--criterion", "label_smoothed_cross_entropy",
        "--label-smoothing", "0.1", "--max-update", "300",
    )
    path = os.path.join(save_dir, "checkpoint_last.pt")
    assert os.path.exists(path)
    return path
