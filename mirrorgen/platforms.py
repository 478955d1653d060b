"""The platform names (conda subdirs) a mirror can be restricted to."""

from __future__ import annotations

from typing import Final

from rattler import Subdir

__all__ = ["KNOWN_SUBDIRS"]

# rattler knows every platform conda clients use; the extra names are spelled as in the source
# documents (seed 004 lists linux-armv6l/armv7l and zos-z).
KNOWN_SUBDIRS: Final[frozenset[str]] = frozenset(str(p) for p in Subdir.all()) | {"zos-z"}
