"""The trainer's one configuration object: the parsed, checked flags of ``fastpref-train``,
read-only. ``fastpref.training.run.build(config)`` makes a run from it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import MappingProxyType

from .args import build_parser, parse_args


class Config:
    """Read-only namespace of the trainer flags (``config.learning_rate``, ...): every
    ``fastpref-train`` flag under its argparse name, plus ``data_path`` and ``data_argument``
    (which of ``--dataset_name`` / ``--train_data_dir`` gave it). Build one with
    ``parse_config``; ``replace`` returns a changed copy."""

    __slots__ = ("_values",)

    def __init__(self, values: dict):
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))

    def __getattr__(self, name: str):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"Config has no flag {name!r}") from None

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"Config is read-only: use config.replace({name}=...)")

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and dict(self._values) == dict(other._values)

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self._values.items())))

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

    def as_dict(self) -> dict:
        """The flags as a plain dict, in the parser's order (what ``args.json`` stores)."""
        return dict(self._values)

    def replace(self, **changes) -> Config:
        """A copy with ``changes``; TypeError for a name that is not a flag. (No re-check:
        ``parse_config`` checks flag values.)"""
        unknown = sorted(set(changes) - set(self._values))
        if unknown:
            raise TypeError(f"Config.replace: unknown flags {unknown}")
        return Config({**self._values, **changes})


def parse_config(argv: Sequence[str] | None = (), **flags) -> Config:
    """The checked ``Config`` of command line ``argv`` (default: none; None: ``sys.argv[1:]``)
    over keyword ``flags`` (argparse names, e.g. ``learning_rate=1e-3``) over the trainer's
    defaults. ValueError names a bad flag value, TypeError an unknown flag name or a value of
    the wrong type."""
    actions = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    unknown = sorted(set(flags) - set(actions))
    if unknown:
        raise TypeError(f"parse_config: unknown flags {unknown}; expected names among {sorted(actions)}")
    flags = {name: _typed(name, actions[name], value) for name, value in flags.items()}
    return Config(vars(parse_args(None if argv is None else list(argv), defaults=flags)))


_ACCEPTED = {float: (int, float), int: (int,), bool: (bool,), str: (str,)}


def _typed(name: str, action, value):
    """A keyword flag checked as the command line would check it: its type (an int for a float
    flag becomes a float) and its choices."""
    kind = bool if isinstance(action.default, bool) and action.type is None else action.type or str
    accepted = _ACCEPTED.get(kind)
    if value is not None and accepted is not None:
        if not isinstance(value, accepted) or (isinstance(value, bool) and kind is not bool):
            raise TypeError(f"--{name}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
        value = float(value) if kind is float else value
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"--{name}: expected one of {list(action.choices)}, got {value!r}")
    return value
