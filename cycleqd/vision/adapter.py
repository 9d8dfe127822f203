"""Image-model adapter: binds a full state dict into a PyTorch ``nn.Module`` for the skills.

The engine and the weight operators only see ``name -> tensor`` mappings; this adapter is
the one place that knows the weights belong to an ``nn.Module`` (here the vision
setting's :class:`~cycleqd.vision.model.DigitCNN`, but any module works). It implements
the :class:`cycleqd.inference.adapter.ModelAdapter` protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn


class ModuleAdapter:
    """Loads ``theta = theta_base + tau`` into one long-lived module and returns it.

    Args:
        module: the module to load weights into (its architecture fixes the expected
            names and shapes), or a zero-argument factory building it.
        device: where the module lives (``"cpu"`` by default).
    Notes:
        The returned module is the same object on every call: it is valid until the next
        ``bind``. It is put in eval mode. Loading is a copy (``load_state_dict``), so the
        caller may free ``weights`` afterwards. Binding the same fingerprint twice in a row
        skips the copy.
    """

    def __init__(self, module: nn.Module | Callable[[], nn.Module], device: str | torch.device = "cpu"):
        self.module = (module if isinstance(module, nn.Module) else module()).to(device)
        self.module.eval()
        self.device = torch.device(device)
        self._expected = {k: tuple(v.shape) for k, v in self.module.state_dict().items()}
        self.fingerprint: str | None = None

    def check(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Raise ValueError naming the first missing, unexpected or mis-shaped tensor."""
        missing = [k for k in self._expected if k not in weights]
        extra = [k for k in weights if k not in self._expected]
        if missing or extra:
            raise ValueError(f"weights do not fit {type(self.module).__name__}: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        for k, shape in self._expected.items():
            if tuple(weights[k].shape) != shape:
                raise ValueError(f"weights[{k!r}] has shape {tuple(weights[k].shape)}, "
                                 f"{type(self.module).__name__} expects {shape}")

    @torch.no_grad()
    def bind(self, weights: Mapping[str, torch.Tensor], fingerprint: str) -> nn.Module:
        """Load ``weights`` (name -> tensor, the module's names and shapes, any float dtype)
        and return the module in eval mode. Raises ValueError for weights that do not fit."""
        if fingerprint is not None and fingerprint == self.fingerprint:
            return self.module
        self.check(weights)
        self.module.load_state_dict({k: v.to(self.device) for k, v in weights.items()}, strict=True)
        self.module.eval()
        self.fingerprint = fingerprint
        return self.module
