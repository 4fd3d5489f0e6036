"""The weights-only allow-list: fairseq checkpoints load, anything else pickled in a checkpoint is refused.

A real checkpoint saved by fairseq's Trainer loads through ``checkpoint_utils.load_checkpoint_to_cpu`` and
through the broadcast that ranks > 0 get in a distributed resume; crafted files with ``os.system``, a
custom class or ``eval`` behind an allow-listed type are refused and their payload never runs. ::

    .venv/bin/pytest tests/test_fairseq_checkpoint.py
"""

import collections
import io
import os
import pickle

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.distributed.utils import _put_tensors_in_obj, _split_tensors_from_obj
from fairseq_helpers import build_trainer, tiny_data_bin_fixture, train_batches
from omegaconf import DictConfig

from fairseq_asam.fairseq_ext.checkpoint import SAFE_GLOBALS

tiny_data_bin = tiny_data_bin_fixture()


def test_allow_list_registration_adds_every_entry_once():
    # At import (checked in fresh processes: tests/test_package.py). Here, in a test process, an earlier
    # test's torch.serialization.safe_globals block (the Hugging Face Trainer's) may have removed some.
    from fairseq_asam.fairseq_ext.checkpoint import allow_fairseq_checkpoints

    allow_fairseq_checkpoints()
    allow_fairseq_checkpoints()
    registered = torch.serialization.get_safe_globals()
    for entry in SAFE_GLOBALS:
        assert registered.count(entry) == 1, entry


@pytest.fixture(scope="module")
def real_checkpoint(tiny_data_bin, tmp_path_factory):
    # One trainer and checkpoint for the tests that only read them.
    tmp_path = tmp_path_factory.mktemp("real-checkpoint")
    trainer, task, cfg = build_trainer(tiny_data_bin, tmp_path, "--task", "translation_sam", "--optimizer", "asam_adam")
    trainer.train_step(train_batches(task, cfg, 1))
    path = tmp_path / "checkpoint_last.pt"
    trainer.consolidate_optimizer()  # what checkpoint_utils.save_checkpoint does first
    trainer.save_checkpoint(str(path), {"train_iterator": {"epoch": 1}})
    return path, trainer


def test_real_checkpoint_loads_with_weights_only(real_checkpoint):
    path, trainer = real_checkpoint
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))  # plain torch.load: weights_only=True
    assert state["cfg"].optimizer._name == "asam_adam"
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(state["model"][k], v)
    assert state["optimizer_history"][-1]["optimizer_name"] == "FairseqASAMAdam"


def test_rank_broadcast_payload_loads_with_weights_only(real_checkpoint):
    # What fairseq's broadcast_object sends to ranks > 0: the loaded state (cfg now a DictConfig),
    # tensors split off, torch.save'd; ranks > 0 torch.load it (weights_only=True by default).
    path, _ = real_checkpoint
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    tensors = []
    skeleton = _split_tensors_from_obj(state, tensors)
    buf = io.BytesIO()
    torch.save(skeleton, buf)
    buf.seek(0)
    received = _put_tensors_in_obj(torch.load(buf, map_location="cpu"), tensors)
    assert isinstance(received["cfg"], DictConfig)
    assert received["cfg"].optimizer.asam_rho == state["cfg"].optimizer.asam_rho == 0.2
    assert all(torch.equal(received["model"][k], v) for k, v in state["model"].items())


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CustomThing:
    def __init__(self):
        self.value = 1


def _crafted(tmp_path, payload):
    path = tmp_path / "crafted.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "cfg": None, "args": None, "extra_state": payload}, path)
    return path


@pytest.mark.parametrize(
    "make_payload,refused_global",
    [
        (lambda marker: _RunsCommand(marker), "system"),
        (lambda marker: CustomThing(), "CustomThing"),
        # An allow-listed container whose contents name a global that is not allowed.
        (lambda marker: collections.defaultdict(eval), "eval"),
    ],
    ids=["os.system", "custom-class", "defaultdict-of-eval"],
)
def test_other_pickled_globals_are_still_refused(tmp_path, make_payload, refused_global):
    marker = tmp_path / "pwned"
    path = _crafted(tmp_path, make_payload(marker))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed") as err:
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert refused_global in str(err.value)
    assert not marker.exists()  # the payload never ran
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)


def test_sharpness_loads_a_bleu_checkpoint_after_a_safe_globals_block_removed_numpy(real_checkpoint, tmp_path):
    # --eval-bleu keeps numpy counts in the saved metrics. A torch.serialization.safe_globals([numpy.ndarray])
    # block (the Hugging Face Trainer loads its RNG state in one) removes numpy.ndarray from the allow-list
    # on exit, after fairseq_ext added it; asam-sharpness, run in the same process, still loads the checkpoint.
    import numpy as np

    from fairseq_asam import sharpness_cli

    path, _ = real_checkpoint
    state = torch.load(path, weights_only=False)
    state["extra_state"]["metrics"] = {"valid": [("_bleu_counts_0", np.arange(4, dtype=np.int64))]}
    bleu_ckpt = tmp_path / "checkpoint_bleu.pt"
    torch.save(state, bleu_ckpt)
    with torch.serialization.safe_globals([np.ndarray]):
        pass
    assert np.ndarray not in torch.serialization.get_safe_globals()
    args = sharpness_cli.build_parser().parse_args(["fairseq", str(bleu_ckpt), "--rho", "0.1", "--split", "valid", "--device", "cpu"])
    model, _, batches, info = sharpness_cli.load_fairseq(args, torch.device("cpu"))
    assert np.ndarray in torch.serialization.get_safe_globals()
    assert info["split"] == "valid" and len(batches) > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k])
