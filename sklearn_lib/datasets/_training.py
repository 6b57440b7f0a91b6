"""Full-batch AdamW training shared by the shipped modular-addition networks."""

import time

import torch
from torch import nn

#: Adam's betas of the grokking literature (a short second-moment memory).
BETAS = (0.9, 0.98)


def _accuracy(forward, X, y):
    with torch.no_grad():
        return float((forward(X).argmax(dim=1) == y).double().mean())


def _train_full_batch(
    model, forward, data, *, epochs, lr, weight_decay, report_every, target_accuracy, verbose
):
    """Minimise the cross-entropy of ``forward(X_train)`` with full-batch AdamW.

    Every ``report_every`` epochs (and at the last) the held-out accuracy is
    measured in eval mode, printed if ``verbose``, and training stops once it
    reaches ``target_accuracy`` (``None``: never). Measuring does not touch the
    optimiser, so a run that stops at epoch ``k`` equals a run of ``k`` epochs.

    Returns the last training loss, the number of epochs run and the seconds taken.
    """
    X_train, X_test, y_train, y_test = data
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=weight_decay, betas=BETAS
    )
    start = time.perf_counter()
    model.train()
    for epoch in range(1, epochs + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(forward(X_train), y_train)
        loss.backward()
        optimizer.step()
        if (verbose or target_accuracy is not None) and (
            epoch % report_every == 0 or epoch == epochs
        ):
            model.eval()
            test_accuracy = _accuracy(forward, X_test, y_test)
            if verbose:
                print(
                    f"epoch {epoch:6d}  loss {loss.item():.3e}  "
                    f"train acc {_accuracy(forward, X_train, y_train):.4f}  "
                    f"test acc {test_accuracy:.4f}  {time.perf_counter() - start:.0f} s",
                    flush=True,
                )
            model.train()
            if target_accuracy is not None and test_accuracy >= target_accuracy:
                break
    model.eval()
    return float(loss.item()), epoch, time.perf_counter() - start


def _training_info(forward, data, *, loss, epochs, seconds, **hyper_parameters):
    """The ``training_info_`` dict common to the shipped networks."""
    X_train, X_test, y_train, y_test = data
    return {
        **hyper_parameters,
        "epochs": int(epochs),
        "betas": list(BETAS),
        "optimizer": "AdamW, full batch, float32",
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "final_loss": loss,
        "train_accuracy": _accuracy(forward, X_train, y_train),
        "test_accuracy": _accuracy(forward, X_test, y_test),
        "train_seconds": seconds,
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
    }
