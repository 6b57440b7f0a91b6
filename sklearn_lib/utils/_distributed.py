"""torch.distributed collectives in our words: every rank raises if any rank failed.

A local step that fails on some ranks must not leave the others waiting in the
next collective: every step ends with an exchange of error messages
(:func:`agree`), and a collective that fails because a peer died or timed out
is reported with the fix.
"""


def call(fn, *args, **kwargs):
    """A collective; a rank that died or timed out is reported in our words."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        # gloo and nccl raise RuntimeError (DistBackendError) when a peer's
        # connection closes or the process group's timeout passes.
        raise RuntimeError(
            "a collective of fit_model(distributed=True) failed: another rank died, was "
            "stopped, or did not reach this point within the process group's timeout "
            "(init_process_group(timeout=...)). Nothing was fitted on this rank. "
            f"torch.distributed said: {exc}"
        ) from exc


def resolve_group(distributed):
    """The process group for ``distributed=True`` or a group; raises if none is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed=True combines the shards of all ranks with torch.distributed, "
            "which is not initialised in this process: call "
            "torch.distributed.init_process_group(backend, ..., timeout=...) on every rank "
            "first (gloo for CPU tensors, nccl for CUDA)."
        )
    return None if distributed is True else distributed


def agree(group, error, what):
    """Exchange whether each rank failed ``what``; raise on every rank if any did."""
    import torch.distributed as dist

    message = None if error is None else f"{type(error).__name__}: {error}"
    messages = [None] * dist.get_world_size(group)
    call(dist.all_gather_object, messages, message, group=group)
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if not failed:
        return
    if error is not None:
        raise error
    ranks = ", ".join(str(r) for r, _ in failed)
    detail = "; ".join(f"rank {r}: {m}" for r, m in failed)
    raise RuntimeError(
        f"{what} failed on rank(s) {ranks}, so every rank stops: {detail}"
    ) from error


def collective(group, what, fn):
    """``fn()`` on this rank; every rank raises if it failed on any."""
    try:
        result, error = fn(), None
    except Exception as exc:  # every rank must learn of it, whatever it is
        result, error = None, exc
    agree(group, error, what)
    return result


def check_same(group, description, what):
    """Raise on every rank unless ``description`` (a dict) is the same on all ranks."""
    import torch.distributed as dist

    descriptions = [None] * dist.get_world_size(group)
    call(dist.all_gather_object, descriptions, description, group=group)
    differ = [
        f"{key}: " + ", ".join(f"rank {r} {d.get(key)!r}" for r, d in enumerate(descriptions))
        for key in description
        if any(d.get(key) != description[key] for d in descriptions)
    ]
    if differ:
        raise ValueError(
            f"{what}: the ranks disagree on {'; '.join(differ)}. Every rank must run the "
            "same model, layers and dtype on its shard of the data."
        )


def all_reduce(t, group, op="SUM"):
    """``t`` all-reduced in place over ``group`` with ``op`` (a ``ReduceOp`` name)."""
    import torch.distributed as dist

    call(dist.all_reduce, t, op=getattr(dist.ReduceOp, op), group=group)
    return t
