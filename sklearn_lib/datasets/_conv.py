"""A small conv net on scikit-learn's 8x8 digits, trained in seconds (no download)."""

import torch
from sklearn.datasets import load_digits
from torch import nn


def train_digits_conv_net(n_train=1400, n_steps=400, random_state=0):
    """Train a two-layer conv net on scikit-learn's 8x8 digits with full-batch AdamW.

    The net is ``nn.Sequential(Conv2d(1, 8, 3, padding=1), ReLU(), Conv2d(8, 16, 3,
    padding=1, stride=2), ReLU(), AdaptiveAvgPool2d(1), Flatten(), Linear(16, 10))``,
    so its ReLU outputs are the modules ``"1"`` (8 channels at 8 x 8 pixels) and
    ``"3"`` (16 channels at 4 x 4 pixels) and the logits ``"6"``: a network whose
    channels can be read as features (:class:`~sklearn_lib.Layer`).

    Parameters
    ----------
    n_train : int, default=1400
        The first ``n_train`` of the 1,797 images are trained on; the rest are held out.
    n_steps : int, default=400
        Full-batch AdamW steps (learning rate 1e-2, weight decay 1e-3).
    random_state : int, default=0
        Seed of the initialisation (``torch.manual_seed``).

    Returns
    -------
    net : torch.nn.Sequential
        The trained net (float32), in eval mode.
    images : torch.Tensor of shape (1797, 1, 8, 8)
        All images, scaled to [0, 1] (float32).
    labels : torch.Tensor of shape (1797,)
        Their digits.

    Examples
    --------
    >>> from sklearn_lib.datasets import train_digits_conv_net
    >>> net, images, labels = train_digits_conv_net(n_steps=5)
    >>> net(images[:2]).shape
    torch.Size([2, 10])
    """
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    labels = torch.tensor(digits.target)
    torch.manual_seed(random_state)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(n_steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(net(images[:n_train]), labels[:n_train]).backward()
        optimiser.step()
    return net.eval(), images, labels
