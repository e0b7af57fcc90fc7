"""TensorRT plugins shipped into engine bundles, one package per plugin (STYLE.md)."""
