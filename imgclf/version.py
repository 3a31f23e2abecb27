"""The project's version: pyproject.toml reads it for the package, and every command's
--version prints it."""
__version__ = "0.1.0"
