"""License families: what ``licenses: ["-gpl3", "mit"]`` filters on.

The family names are seed 004's list plus the families conda-build writes into ``license_family``
(GPL, CC, MOZILLA). A record's family comes from its ``license_family`` field; when that is missing
it is derived from the SPDX ``license`` expression. No maintained library maps SPDX identifiers to
these coarse families, so the table below is ours; the SPDX expression is only split on its
operators, never otherwise interpreted.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final

__all__ = ["LICENSE_FAMILIES", "normalize_family", "families_of"]

LICENSE_FAMILIES: Final[tuple[str, ...]] = (
    "agpl", "gpl2", "gpl3", "gpl", "lgpl", "bsd", "mit", "apache", "psf", "cc", "mozilla",
    "public_domain", "proprietary", "other", "none",
)

_SPLIT_RE: Final = re.compile(r"\s+(?:AND|OR|WITH|and|or|with)\s+|[()/,;|]|\s+\+\s+")

# Ordered: the first matching prefix wins (LGPL before GPL, AGPL before GPL).
_SPDX_PREFIXES: Final[tuple[tuple[str, str], ...]] = (
    ("agpl", "agpl"), ("lgpl", "lgpl"), ("gpl-3", "gpl3"), ("gplv3", "gpl3"), ("gpl3", "gpl3"),
    ("gpl-2", "gpl2"), ("gplv2", "gpl2"), ("gpl2", "gpl2"), ("gpl", "gpl"),
    ("bsd", "bsd"), ("0bsd", "bsd"), ("mit", "mit"), ("x11", "mit"), ("isc", "mit"),
    ("apache", "apache"), ("psf", "psf"), ("python-2", "psf"), ("python software", "psf"),
    ("cc0", "public_domain"), ("unlicense", "public_domain"), ("public domain", "public_domain"),
    ("public-domain", "public_domain"), ("cc-", "cc"), ("cc ", "cc"), ("mpl", "mozilla"),
    ("mozilla", "mozilla"), ("proprietary", "proprietary"), ("licenseref-proprietary", "proprietary"),
    ("commercial", "proprietary"),
)


def normalize_family(value: str) -> str:
    """``'Public-Domain'`` -> ``'public_domain'``; ``'APACHE'`` -> ``'apache'``."""
    return value.strip().lower().replace("-", "_").replace(" ", "_")


def _family_of_term(term: str) -> str:
    t = term.strip().lower()
    if not t:
        return "none"
    for prefix, family in _SPDX_PREFIXES:
        if t.startswith(prefix):
            return family
    return "other"


# Free-text spellings conda-build's license guesser also reads as GPL2/GPL3: "GPL 3", "GPL v3",
# "GPL (>= 3)", "LGPL v2.1".
_GPL_TEXT_RE: Final = re.compile(r"\b((?:L|A)?GPL)\s*(?:\(\s*>=?\s*|v\s*|\s+)(\d)", re.IGNORECASE)


def _spdx_families(license: str | None) -> frozenset[str]:
    if not license or not license.strip() or license.strip().lower() in ("none", "unknown"):
        return frozenset({"none"})
    license = _GPL_TEXT_RE.sub(r"\1-\2", license)
    # R's "MIT + file LICENSE" names a file with more terms, not another license.
    terms = [t for t in _SPLIT_RE.split(license) if t and t.strip() and not t.strip().lower().startswith("file ")]
    return frozenset(_family_of_term(t) for t in terms) or frozenset({"none"})


@lru_cache(maxsize=1 << 16)  # a channel has a few thousand distinct (family, license) pairs
def families_of(license_family: str | None, license: str | None) -> frozenset[str]:
    """The families a record belongs to: its license_family and every family its SPDX names.

    Both count because real records disagree: conda-forge writes ``license_family: GPL`` with
    ``license: GPL-3.0-only``, and ``-gpl3`` must catch that record. SPDX terms we cannot place
    add nothing when a license_family is given (they would only add "other").
    """
    spdx = _spdx_families(license)
    if license_family and license_family.strip():
        family = normalize_family(license_family)
        family = family if family in LICENSE_FAMILIES else "other"
        return frozenset({family}) | (spdx - {"other", "none"})
    return spdx
