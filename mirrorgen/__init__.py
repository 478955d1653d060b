"""mirrorgen: static, verified mirrors of conda channels, PyPI and CRAN."""

__version__ = "0.1.0"
__all__ = ["__version__"]
