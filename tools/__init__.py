"""Repository tooling (not part of the library): ``python -m tools.house`` measures its shape."""
