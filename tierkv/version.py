"""The package version, in a module of its own: one source for ``tierkv.__version__``, the build
(pyproject reads it without importing the package) and files that record which tierkv wrote them."""

__version__ = "0.1.0"
