"""The metrics of one loss call: a mapping by name whose tensors are made when first read.

Every fused loss writes its metrics into the call's single output buffer (kernels/method.py,
`Layout`): the values exist on the device as soon as the head has run, whether or not anybody
reads them. What costs host time is the Python side: one tensor view per metric (about a
microsecond each, and a loss has up to a dozen). `LossMetrics` makes those views on the first
access of any key (or on iteration, `len`, `repr`, ...), all at once, and keeps them; a step
that only calls ``loss.backward()`` never makes them. Reading them later gives the same values
as reading them right away: nothing writes the buffer after the call.
"""

from collections.abc import MutableMapping


class LossMetrics(MutableMapping):
    """metric name -> detached tensor (0-dim, [B] or [B, B]; accumulation dtype, or int64 for
    integer metrics), with a dict's behaviour: ``m["implicit_acc"]``, ``m["grad_norm"] = x``,
    ``dict(m)``, ``{**m}``, iteration in the method's metric order. The views into the call's
    output buffer are made on first access (module docstring). ``LossMetrics(mapping)`` or
    ``LossMetrics(**values)`` makes one from ready values, as ``dict`` would."""

    __slots__ = ("_views", "_source")

    def __init__(self, *args, **kwargs):
        self._views = dict(*args, **kwargs)
        self._source = None

    @classmethod
    def of_call(cls, layout, pieces, ints, pairs, drop=()):
        """The metrics of a call, from `Layout.named`'s arguments (its views made on first access)."""
        metrics = cls.__new__(cls)
        metrics._views = None
        metrics._source = (layout, pieces, ints, pairs, drop)
        return metrics

    def _all(self):
        views = self._views
        if views is None:
            layout, pieces, ints, pairs, drop = self._source
            views = self._views = layout.named(pieces, ints, pairs, drop)
            self._source = None
        return views

    def __getitem__(self, name):
        return self._all()[name]

    def __setitem__(self, name, value):
        self._all()[name] = value

    def __delitem__(self, name):
        del self._all()[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self):
        return len(self._all())

    def __contains__(self, name):
        return name in self._all()

    def keys(self):
        return self._all().keys()

    def items(self):
        return self._all().items()

    def values(self):
        return self._all().values()

    def copy(self):
        """A plain dict of the same tensors."""
        return dict(self._all())

    def __repr__(self):
        return f"LossMetrics({self._all()!r})"

    def __reduce__(self):  # pickle / copy: as a mapping of its values
        return type(self), (self._all(),)
