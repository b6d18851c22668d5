"""CPS / e-CPS strong-authentication gateway for French health portals."""

__version__ = "0.1.0"
