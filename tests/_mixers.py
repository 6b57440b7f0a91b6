"""A small sequence model whose middle section mixes positions (tests of the model source)."""

import torch
from torch import nn


class Mixer(nn.Module):
    """A residual stream mixed across positions (a causal average), then a Tanh layer.

    With an ``attention_mask`` the padded positions are left out of the average,
    as a Hugging Face model leaves them out of its attention. Layers: ``resid``
    (after the embedding), ``mid`` (after the mixing) and ``head`` (the last
    position's outputs).
    """

    def __init__(self, d_in, d):
        super().__init__()
        self.embed, self.resid = nn.Linear(d_in, d), nn.Identity()
        self.fc, self.mid, self.head = nn.Linear(d, d), nn.Identity(), nn.Linear(d, 3)

    def forward(self, x, attention_mask=None):
        h = self.resid(self.embed(x))
        n_positions = h.shape[1]
        weights = torch.ones(n_positions, n_positions, dtype=h.dtype).tril()
        weights = weights[None] * (1.0 if attention_mask is None
                                   else attention_mask[:, None, :].to(h.dtype))
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1)
        mixed = self.mid(h + torch.tanh(self.fc(weights @ h)))
        return self.head(mixed[:, -1])


def mixer(d_in, d, seed=3):
    """A float64 :class:`Mixer` with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return Mixer(d_in, d).double()
