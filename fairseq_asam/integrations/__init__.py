"""Integrations with other training frameworks; each module imports its framework, this package nothing.

``fairseq_asam.integrations.transformers``: ASAM/SAM in Hugging Face Transformers' ``Trainer`` and
``Seq2SeqTrainer`` (needs the ``hf`` extra: ``pip install "fairseq-asam[hf]"``).
"""
