"""The random state a forward pass draws from, saved before a first pass and replayed before the second.

Both passes of one sharpness-aware update must see the same dropout masks (ShakeDrop draws, ...), so the
gradient at w + eps belongs to the same stochastic loss whose ascent direction was taken (paper Section 4:
g and g' of one mini-batch loss). Every front end (the vision step, the fairseq task, the Hugging Face
integration) saves :func:`random_state` before each micro-batch's first forward and calls
:func:`set_random_state` before its second::

    python -c "import torch; from fairseq_asam.replay import random_state, set_random_state; \\
s = random_state(); a = torch.rand(2); set_random_state(s); print(torch.equal(a, torch.rand(2)))"
"""

from __future__ import annotations

import torch

__all__ = ["random_state", "set_random_state"]


def random_state(device: torch.device | str | None = None) -> dict:
    """The CPU generator's state and, for a CUDA ``device`` (or, with none given, the current CUDA device
    once CUDA is initialized), that device's."""
    state = {"cpu": torch.get_rng_state()}
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda":
            state["cuda"] = (device, torch.cuda.get_rng_state(device))
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        current = torch.device("cuda", torch.cuda.current_device())
        state["cuda"] = (current, torch.cuda.get_rng_state(current))
    return state


def set_random_state(state: dict) -> None:
    """Put back a state from :func:`random_state`."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        device, cuda_state = state["cuda"]
        torch.cuda.set_rng_state(cuda_state, device)
