"""Sections that are a run of children of a plain ``nn.Sequential``.

Map each recorded layer to its positions "between two children" of (possibly
nested) plain ``nn.Sequential`` containers (:func:`~._overrides.is_plain_sequential`:
exact ``nn.Sequential`` without an instance-level ``forward`` or hooks, so that
it runs its children in order); if both layers of a section have a position in
the same container, the children between them, with nested plain Sequentials
expanded, compute the section. :func:`section_leaves` returns them when none
of them computes something else than its class (:func:`~._overrides.override`),
so that the section can run from a recorded activation instead of the whole
model; :mod:`sklearn_lib.models._fastpath` looks for closed forms among them.
"""

from ._overrides import global_hooks, is_plain_sequential, override

__all__ = ["candidate_leaves", "run_leaves", "section_leaves"]


def _positions(modules, name, kind):
    """All ``(container, index)`` naming the value between children ``index-1`` and ``index``.

    ``name``/``kind`` is a recorded layer (module path, "input" or "output").
    Equivalent positions are followed up (the start or end of a nested
    Sequential is a position in its parent) and down (a position next to a
    Sequential child is also that child's start or end).
    """
    found = set()
    todo = []
    module = modules[name]
    if is_plain_sequential(module):
        todo.append((name, 0 if kind == "input" else len(module)))
    if name:
        parent_name, _, key = name.rpartition(".")
        parent = modules[parent_name]
        if is_plain_sequential(parent):
            index = list(parent._modules).index(key)
            todo.append((parent_name, index if kind == "input" else index + 1))
    while todo:
        container, pos = todo.pop()
        if (container, pos) in found:
            continue
        found.add((container, pos))
        seq = modules[container]
        children = list(seq._modules.items())
        prefix = f"{container}." if container else ""
        # Down: the start of the next child / the end of the previous one.
        if pos < len(children) and is_plain_sequential(children[pos][1]):
            todo.append((prefix + children[pos][0], 0))
        if pos > 0 and is_plain_sequential(children[pos - 1][1]):
            child = children[pos - 1][1]
            todo.append((prefix + children[pos - 1][0], len(child)))
        # Up: the boundary of this container is a position in its parent.
        if container and pos in (0, len(children)):
            parent_name, _, key = container.rpartition(".")
            parent = modules[parent_name]
            if is_plain_sequential(parent):
                index = list(parent._modules).index(key)
                todo.append((parent_name, index + (pos == len(children))))
    return found


def _flatten(modules):
    for module in modules:
        if is_plain_sequential(module):
            yield from _flatten(module.children())
        else:
            yield module


def candidate_leaves(model, a, b):
    """Yield the flattened module lists that compute section ``a -> b`` (module docstring)."""
    if global_hooks():
        return
    modules = dict(model.named_modules())
    starts = _positions(modules, a.name, a.kind)
    ends = _positions(modules, b.name, b.kind)
    for container, pa in sorted(starts):
        for other, pb in sorted(ends):
            if other != container or pb < pa:
                continue
            seq = modules[container]
            yield list(_flatten(list(seq.children())[pa:pb]))


def section_leaves(model, a, b):
    """The modules that, run in order on ``a``'s activation, give ``b``'s; or None.

    The same rule as :func:`~sklearn_lib.models._fastpath.detect_section` without
    the restriction to Linear and elementwise modules: any section inside one
    plain ``nn.Sequential`` whose modules have no :func:`~._overrides.override`
    (hooks, an instance-level ``forward``). Running only these modules, from a recorded
    activation, replaces running the whole model from its input. Not for layers
    restricted to chosen positions: their recorded activation lacks the other
    positions, which the section still reads. Nor for layers with declared axes:
    their recorded (batch, P, d) view is not what the section's modules take.
    """
    if a.positions is not None or b.positions is not None:
        return None
    if a.axes is not None or b.axes is not None:
        return None
    for leaves in candidate_leaves(model, a, b):
        if not any(override(module) for module in leaves):
            return leaves
        return None
    return None


def run_leaves(leaves, t):
    """Apply ``leaves`` in order (the forward of the ``nn.Sequential`` they came from)."""
    for module in leaves:
        t = module(t)
    return t
