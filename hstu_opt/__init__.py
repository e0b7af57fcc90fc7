"""hstu-opt: turn an HSTU checkpoint into a versioned engine bundle.

Importing this package never imports triton, onnxruntime or tensorrt; those load lazily
when a stage or backend needs them.
"""

__version__ = "0.1.0"
