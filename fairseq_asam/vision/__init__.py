"""The torchvision entry point (paper Section 5.2, 5.4): CIFAR-10/100 and ImageNet with SGD, SAM and ASAM.

Torch and torchvision only (no fairseq). Modules: ``models`` (the paper's CIFAR networks),
``data`` (CIFAR pickles, ImageFolder, label noise), ``step`` (one SAM/ASAM update with m-sharpness,
DDP and AMP, around ``fairseq_asam.core``), ``fsdp`` (``--fsdp``: fully_shard and sharded checkpoints),
``train`` (the ``asam-vision-train`` command),
``report`` (summary tables and accuracy plots).

    python -m fairseq_asam.vision --help
"""
