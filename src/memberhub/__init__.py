"""memberhub: a self-hosted membership and loyalty service with an integration hub."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memberhub")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
