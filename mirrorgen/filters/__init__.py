"""The filters, one module each, shared by every ecosystem; ``pipeline`` applies them in the
source documents' order (SPEC §3)."""

from .pipeline import FilterOutcome, apply_filters

__all__ = ["FilterOutcome", "apply_filters"]
