"""The TensorRT plugin for hstu-opt's fused attention node `hstu::HstuAttention` (stages/fuse.py).

  spec.py     what the node and plugin accept and compute (pure Python: attributes, formats, shapes, args)
  kernel.py   the Triton kernel (padded layout, mask built from the lengths); compile time and tests only
  compile.py  ahead-of-time cubins per architecture into cubins/sm_XX/ (+ manifest.json of launch metadata)
  runtime.py  loads a cubin and launches it with cuda-python's driver API (no Triton, no TensorRT)
  plugin.py   the IPluginV3 / IPluginCreatorV3One classes for `tensorrt` or `tensorrt_rtx`, and register()

Importing the package imports neither TensorRT, Triton nor CUDA.
"""

from . import plugin, spec  # noqa: F401
