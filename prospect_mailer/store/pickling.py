"""Cheap pickles for the plain data that goes to the writer process with every commit."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["plain_pickle"]

C = TypeVar("C", bound=type)


def plain_pickle(cls: C) -> C:
    """Pickle the dataclass ``cls`` as its class and field values, rebuilt by calling it.

    A slotted dataclass pickles through ``dataclasses``' own ``__getstate__``, a Python
    loop over its fields (2-5 µs each, and every commit of the relay carries several: about
    a quarter of a commit's pickling); this is one tuple. Only for a class whose fields are
    all ``__init__`` arguments, whose ``__init__`` (and ``__post_init__``) accepts again what
    it built.
    """
    names = tuple(f.name for f in dataclasses.fields(cls))
    if any(not f.init for f in dataclasses.fields(cls)):
        raise TypeError(f"{cls.__name__} has fields that are not __init__ arguments")

    def __reduce__(self: Any) -> tuple[type, tuple[Any, ...]]:
        return cls, tuple([getattr(self, name) for name in names])

    cls.__reduce__ = __reduce__  # type: ignore[assignment]
    return cls
