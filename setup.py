"""fairseq-asam: ASAM and SAM (sharpness-aware minimization) for fairseq and torchvision.

Install with `make install` (see README.md): torch and fairseq need a fixed install order that
plain `pip install .` cannot express, so this file declares no torch/fairseq requirement itself.
"""
from setuptools import find_packages, setup

setup(
    name="fairseq-asam",
    version="0.1.0",
    description="Adaptive Sharpness-Aware Minimization (ASAM) and SAM for fairseq and torchvision",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["fairseq_asam", "fairseq_asam.*"]),
    include_package_data=True,
    package_data={"fairseq_asam": ["data/*", "data/**/*", "config/*", "config/**/*"]},
    # torch, torchvision and fairseq(-fixed) are installed by `make install` in a fixed order.
    install_requires=[
        "sacrebleu>=2,<3",
        "sentencepiece",
        "sacremoses",
        "subword-nmt",
        "matplotlib",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "ruff"]},
    entry_points={
        "console_scripts": [
            "asam-vision-train=fairseq_asam.vision.train:cli_main",
            "asam-sharpness=fairseq_asam.sharpness_cli:cli_main",
        ],
    },
)
