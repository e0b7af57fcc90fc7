"""The plugin's run time without TensorRT or Triton: load the ahead-of-time cubin for the current GPU
with cuda-python's driver API and launch it on the caller's stream.

`Runtime.enqueue` takes what TensorRT's IPluginV3OneRuntime.enqueue receives (tensor descriptors with
`.type` (a DataType, read by name) and `.dims`, device pointers as ints, the workspace and the stream
as ints), so the TensorRT plugin's enqueue is one call into it, and benchmarks/gpu_plugin.py calls it
directly on a GPU without TensorRT.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

from . import spec

CTYPES = {"u64": ctypes.c_uint64, "b64": ctypes.c_uint64, "u32": ctypes.c_uint32, "b32": ctypes.c_uint32,
          "s32": ctypes.c_int32, "f32": ctypes.c_float}


def _driver():
    """cuda-python's driver module (cuda.bindings.driver; `cuda.cuda` in cuda-python < 12.6)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        from cuda import cuda as driver
    return driver


def _check(result):
    """cuda-bindings returns (CUresult, *values): raise on an error, return the values."""
    driver = _driver()

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, msg = driver.cuGetErrorString(err)
        raise RuntimeError(f"{spec.NAME} plugin: CUDA driver error {err}: {msg.decode() if msg else ''}")
    return values[0] if len(values) == 1 else values


def current_arch() -> int:
    """Compute capability of the current context's device, e.g. 90."""
    driver = _driver()

    _check(driver.cuInit(0))
    dev = _check(driver.cuCtxGetDevice())
    attr = driver.CUdevice_attribute
    major = _check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev))
    minor = _check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev))
    return 10 * major + minor


class Kernels:
    """The cubins of one architecture (cubins/sm_XX): metadata, and functions loaded once per context."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.manifest = json.loads((self.folder / "manifest.json").read_text())
        except OSError as exc:
            arch = self.folder.name.removeprefix("sm_")
            raise spec.PluginError(f"{spec.NAME}: no compiled kernels for this GPU (sm_{arch}) in {self.folder.parent}: "
                                   f"compile them with `python -m plugins.hstu_attention.compile --arch {arch}` and "
                                   "rebuild the bundle") from exc
        self._functions: dict = {}

    def meta(self, dtype: str, d: int) -> dict:
        name = spec.variant(dtype, d)
        if name not in self.manifest["kernels"]:
            raise spec.PluginError(f"{spec.NAME}: no {dtype} kernel for head dim {d} in {self.folder}")
        return self.manifest["kernels"][name]

    def function(self, dtype: str, d: int):
        driver = _driver()

        ctx = int(_check(driver.cuCtxGetCurrent()))
        key = (ctx, dtype, d)
        if key not in self._functions:
            meta = self.meta(dtype, d)
            image = ctypes.create_string_buffer((self.folder / meta["cubin"]).read_bytes())
            module = _check(driver.cuModuleLoadData(ctypes.addressof(image)))
            fn = _check(driver.cuModuleGetFunction(module, meta["kernel"].encode()))
            if meta["shared"] > 48 * 1024:  # above the default the function must opt in
                _check(driver.cuFuncSetAttribute(
                    fn, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, meta["shared"]))
            self._functions[key] = (module, fn, meta)
        return self._functions[key]


def _pack(values: list, params: list[str]):
    """kernelParams for cuLaunchKernel: a void* array pointing at each value in its PTX type."""
    if len(values) != len(params):
        raise RuntimeError(f"{spec.NAME}: {len(values)} arguments for a kernel of {len(params)} parameters")
    held = [CTYPES[p](v) for v, p in zip(values, params)]
    array = (ctypes.c_void_p * len(held))(*[ctypes.addressof(h) for h in held])
    return held, array


class Runtime:
    """One node's run time: its attributes and the cubins of the GPU it runs on."""

    def __init__(self, attrs: spec.Attributes, cubin_root: Path, arch: int | None = None):
        self.attrs, self.cubin_root, self._arch = attrs, Path(cubin_root), arch
        self._kernels: Kernels | None = None

    def kernels(self) -> Kernels:
        if self._kernels is None:
            arch = self._arch or current_arch()
            self._kernels = Kernels(self.cubin_root / f"sm_{arch}")
        return self._kernels

    def launch_args(self, input_desc, inputs, outputs, meta: dict) -> tuple[tuple, list]:
        """(grid, the kernel's argument values in its PTX parameter order) for one enqueue."""
        B, n, H, d = (int(x) for x in input_desc[0].dims)
        pointers = [int(inputs[0]), int(inputs[1]), int(inputs[2]), int(outputs[0]), int(inputs[3]), int(inputs[4]),
                    int(inputs[5])]
        step = 2 if input_desc[3].type.name == "INT64" else 1
        values = pointers + spec.scalar_args(self.attrs, n, H, step) + [0] * meta["trailing_null_pointers"]
        return spec.grid(B, n, H, meta["block_m"]), values

    @staticmethod
    def variant_of(input_desc) -> tuple[str, int]:
        """(dtype tag, head dim) of the cubin this launch needs; refuses what was not compiled and checked."""
        d, dv = int(input_desc[0].dims[3]), int(input_desc[2].dims[3])
        spec.check_head_dims(d, dv)
        name = input_desc[0].type.name
        if name not in spec.DTYPE_TAG or input_desc[3].type.name != input_desc[4].type.name:
            raise spec.PluginError(f"{spec.NAME}: inputs of type {name} / lengths {input_desc[3].type.name}, "
                                   f"{input_desc[4].type.name} are not supported (spec.supports)")
        return spec.DTYPE_TAG[name], d

    def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream) -> int:
        driver = _driver()

        _, fn, meta = self.kernels().function(*self.variant_of(input_desc))
        grid, values = self.launch_args(input_desc, inputs, outputs, meta)
        held, array = _pack(values, meta["params"])
        if grid[0] * grid[1] > 0:
            _check(driver.cuLaunchKernel(fn, *grid, meta["threads"], 1, 1, meta["shared"], driver.CUstream(int(stream)),
                                         ctypes.addressof(array), 0))
        del held  # (the values must live until the launch has read them)
        return 0
