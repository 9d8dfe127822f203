"""The small CNN of the vision setting (8x8 grey-scale digits -> 10 classes).

No normalisation layers and no buffers: the state dict holds only trainable weights, so
every tensor has a task vector and merging needs no running-statistics repair.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class DigitCNN(nn.Module):
    """conv(1->c, 3x3) -> ReLU -> maxpool 2 -> conv(c->2c, 3x3) -> ReLU -> fc(32c->h) -> ReLU -> fc(h->10).

    Args:
        channels: c, the first conv's output channels (default 16; ~38k parameters).
        hidden: h, the hidden fully connected width (default 64).
        generator: source of the random init (PyTorch's default scheme: weights
            kaiming-uniform with a = sqrt(5), biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)));
            ``None`` uses a fixed generator seeded with 0, never the global RNG.
    Input: float32 (N, 1, 8, 8), pixels in [0, 1]. Output: float32 logits (N, 10).
    State dict: ``conv1.weight`` (c, 1, 3, 3), ``conv1.bias`` (c,), ``conv2.weight``
    (2c, c, 3, 3), ``conv2.bias`` (2c,), ``fc1.weight`` (h, 32c), ``fc1.bias`` (h,),
    ``fc2.weight`` (10, h), ``fc2.bias`` (10,), all float32.
    """

    def __init__(self, channels: int = 16, hidden: int = 64, generator: torch.Generator | None = None):
        super().__init__()
        if channels < 1 or hidden < 1:
            raise ValueError(f"channels and hidden must be >= 1, got {channels}, {hidden}")
        self.channels, self.hidden = channels, hidden
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.fc1 = nn.Linear(2 * channels * 16, hidden)
        self.fc2 = nn.Linear(hidden, 10)
        self.reset_parameters(generator if generator is not None else torch.Generator().manual_seed(0))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Re-draw every weight and bias from ``generator`` (PyTorch's default init scheme)."""
        for layer in (self.conv1, self.conv2, self.fc1, self.fc2):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            fan_in = layer.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (1, 8, 8):
            raise ValueError(f"DigitCNN expects (N, 1, 8, 8) input, got {tuple(x.shape)}")
        h = torch.max_pool2d(torch.relu(self.conv1(x)), 2)   # (N, c, 4, 4)
        h = torch.relu(self.conv2(h))                          # (N, 2c, 4, 4)
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Arg-max class predictions, int64 (N,), for float32 input (N, 1, 8, 8)."""
    was_training = model.training
    model.eval()
    out = [model(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on (x (N, 1, 8, 8), y (N,))."""
    if y.numel() == 0:
        raise ValueError("accuracy of an empty set")
    return float((predict(model, x) == y).float().mean())
