"""A tiny attention model shared by the tests of sequence layers."""

import torch
from torch import nn

N, P, D_IN, D = 6, 3, 3, 4


class TinyAttention(nn.Module):
    """Embedding, one attention layer on a residual stream, a readout of the last position."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Linear(D_IN, D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.out = nn.Linear(D, D)
        self.pool = nn.Identity()
        self.head = nn.Linear(D, 2)

    def mix(self, h):
        return self.out(h + self.attn(h, h, h, need_weights=False)[0])

    def forward(self, x):
        y = self.mix(self.embed(x))
        return self.head(self.pool(torch.tanh(y[:, -1])))
