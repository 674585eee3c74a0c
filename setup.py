"""fairseq-kd: knowledge distillation criterions and tasks for fairseq translation."""

import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="fairseq-kd",
    version="0.1.0",
    description="Knowledge distillation (word, sequence, TIE-KD, self-evolution, gated hybrid) "
    "for fairseq Transformer translation models",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    # user_dir/ (the --user-dir of fairseq's tools) is also installed, as fairseq_kd_user_dir
    packages=find_packages(include=["fairseq_kd", "fairseq_kd.*"]) + ["fairseq_kd_user_dir"],
    package_dir={"fairseq_kd_user_dir": "user_dir"},
    install_requires=[
        # torch is a requirement, but install the build you want first
        # (README: `pip install torch==2.13.0`); any torch >= 1.13 satisfies this.
        "torch>=1.13",
        # the official release imports on Python < 3.11 only; the fork provides the
        # same `fairseq` package (same API) on Python >= 3.11
        "fairseq==0.12.2; python_version < '3.11'",
        "fairseq-fixed==0.12.3.1; python_version >= '3.11'",
        "sacrebleu>=2.0",
        "sentencepiece>=0.1.97",
        "subword-nmt>=0.3.8",
        "sacremoses>=0.0.53",
        "tqdm",
        "numpy",
    ],
    extras_require={
        # the CTranslate2 teacher-decoding backend (`fairseq-kd-decode decode --backend ctranslate2`)
        "ct2": ["ctranslate2>=4.0"],
        # COMET scores in the recipes' tables (--comet-model PATH)
        "comet": ["unbabel-comet>=2.0"],
        # examples/multi30k/study.sh: its Seq-KD decoding (CTranslate2) and its plots
        "study": ["ctranslate2>=4.0", "matplotlib"],
        "test": ["pytest>=7", "ctranslate2>=4.0", "matplotlib"],
    },
    # the command-line tools, named in fairseq's style; each is also `python -m MODULE`
    entry_points={
        "console_scripts": [
            "fairseq-kd-prepare = fairseq_kd.prepare:main",
            "fairseq-kd-prepare-bpe = fairseq_kd.prepare_bpe:main",
            "fairseq-kd-prepare-unlabeled = fairseq_kd.unlabeled:main",
            "fairseq-kd-wmt = fairseq_kd.wmt.cli:main",
            "fairseq-kd-decode = fairseq_kd.decoding.cli:main",
            "fairseq-kd-score = fairseq_kd.scoring:main",
            "fairseq-kd-average-checkpoints = fairseq_kd.checkpoints:main_average",
            "fairseq-kd-build-cache = fairseq_kd.cache.cli:main",
            "fairseq-kd-analyze-teacher = fairseq_kd.study.teacher_analysis:main",
            "fairseq-kd-study-report = fairseq_kd.study.report:main",
            "fairseq-kd-export = fairseq_kd.export:main",
            "fairseq-kd-deployment = fairseq_kd.deployment:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "License :: OSI Approved :: MIT License",
    ],
    license="MIT",
)
