"""Radiographic views (PA, AP, lateral) and the ``--views`` filter of preprocess and predict.

A record's view comes from its manifest's ``view`` column when that cell is filled, otherwise from
a DICOM file's ViewPosition (0018,5101); it is empty ("unknown") for a JPEG or PNG without a
manifest view. Names are normalised (:func:`normalise_view`) so that spellings seen in public
collections and PACS exports compare equal: every AP variant ("AP Supine", "AP_ERECT",
"AP portable") is ``AP``; ``LL``, ``RL``, ``LAT`` and ``LATERAL`` are ``LATERAL``.

The filter (:class:`ViewFilter`) keeps the views it names. An image whose view is unknown is kept
(most JPEG collections record no view), unless the list names ``-unknown``:
``--views PA,AP`` keeps PA, AP and unknown; ``--views PA,AP,-unknown`` keeps PA and AP only.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from covid_spark.errors import ConfigError

UNKNOWN = "unknown"
EXCLUDE_UNKNOWN = "-unknown"

_LATERAL = frozenset({"LL", "RL", "LAT", "LATERAL", "LEFT LATERAL", "RIGHT LATERAL"})


def normalise_view(value) -> str:
    """The canonical name of a view: ``PA``, ``AP``, ``LATERAL``, another name upper-cased, or ``""``."""
    return _normalise_text(str(value or ""))


@functools.lru_cache(maxsize=1024)  # a manifest repeats a few view names on every line
def _normalise_text(value: str) -> str:
    text = re.sub(r"[\s_\-]+", " ", value).strip().upper()
    if not text:
        return ""
    if text == "AP" or text.startswith("AP "):
        return "AP"
    if text == "PA" or text.startswith("PA "):
        return "PA"
    if text in _LATERAL:
        return "LATERAL"
    return text


@dataclass(frozen=True)
class ViewFilter:
    """Which views to keep; see the module docstring. ``ViewFilter.parse("")`` keeps everything."""

    keep: frozenset[str] = frozenset()
    keep_unknown: bool = True
    spec: str = ""

    @classmethod
    def parse(cls, spec: str | None) -> "ViewFilter":
        """Parse ``"PA,AP"`` or ``"PA,AP,-unknown"``; an empty spec keeps every view.

        Raises:
            ValueError: the spec names no view to keep, or a token is empty.
        """
        spec = (spec or "").strip()
        if not spec:
            return cls()
        keep, keep_unknown = set(), True
        for token in spec.split(","):
            token = token.strip()
            if not token:
                raise ConfigError(f"--views / preprocess.views {spec!r}: empty name between commas")
            if token.lower() == EXCLUDE_UNKNOWN:
                keep_unknown = False
            elif token.lower() == UNKNOWN:
                keep_unknown = True
            else:
                keep.add(normalise_view(token))
        if not keep:
            raise ConfigError(f"--views / preprocess.views {spec!r} names no view to keep (e.g. PA,AP)")
        return cls(frozenset(keep), keep_unknown, spec)

    @property
    def active(self) -> bool:
        return bool(self.keep)

    def reason(self, view: str) -> str | None:
        """Why an image of ``view`` is left out, or None to keep it."""
        if not self.keep:
            return None
        view = normalise_view(view)
        if not view:
            return None if self.keep_unknown else f"view unknown, excluded by views {self.spec}"
        return None if view in self.keep else f"view {view} not in views {self.spec}"
