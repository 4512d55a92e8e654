"""keel's version, importable from every floor without importing the package root."""

__version__ = "0.1.0"
