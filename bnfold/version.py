"""bnfold's version (``bnfold.__version__``): a leaf module, so that the layers below the public
API can name it without importing the package's ``__init__``."""
from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
