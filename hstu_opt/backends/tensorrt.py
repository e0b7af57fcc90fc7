"""TensorRT: serialized engines from the fused or Q/DQ ONNX through the TensorRT Python API.

Works with `tensorrt` (TensorRT proper) or `tensorrt_rtx` (same API). TensorRT proper cannot be
installed in this workplace; TensorRT-RTX can, and builds real plans on a machine without a GPU for
RTX targets (SM75..SM121). Running a plan needs a GPU of the target's compute capability, which no
machine here has: `load`/`run` are kept small and are not exercised by the tests (README says so).

Networks are strongly typed (precision comes from the graph: float32 tensors, Q/DQ nodes), as
TensorRT 11 and TensorRT-RTX require.
"""

from __future__ import annotations

import importlib
import json
from collections import Counter
from pathlib import Path

from hstu_opt.errors import BackendUnavailable, StageError
from hstu_opt.fsutil import sha256_file

NAME = "tensorrt"
# Which dims of each contract input follow which profile axis (b: batch, h: history, c: candidates).
INPUT_AXES = {"hist_ids": "bh", "hist_ratings": "bh", "hist_timestamps": "bh", "hist_lengths": "b", "cand_ids": "bc",
              "num_candidates": "b", "query_time": "b", "contextual_ids": "bx"}


def trt_module():
    """`tensorrt` if installed, else `tensorrt_rtx`."""
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BackendUnavailable(NAME, "tensorrt or tensorrt_rtx", "tensorrt-rtx")


def is_rtx(trt) -> bool:
    return trt.__name__ == "tensorrt_rtx"


def plugin_registered(trt, name: str, version: str, namespace: str) -> bool:
    return any(c.name == name and c.plugin_version == version and c.plugin_namespace == namespace
               for c in trt.get_plugin_registry().all_creators)


def import_plugin(package_dir: Path):
    """The plugin package at package_dir (a bundle's copy of plugins/hstu_attention), imported under a name of
    its own so it never mixes with another copy on sys.path."""
    import hashlib
    import importlib.util
    import sys

    package_dir = Path(package_dir).resolve()
    name = "hstu_plugin_" + hashlib.sha256(str(package_dir).encode()).hexdigest()[:12]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, package_dir / "__init__.py",
                                                      submodule_search_locations=[str(package_dir)])
        if spec is None or not (package_dir / "__init__.py").is_file():
            raise StageError(f"{package_dir}: not a plugin package (no __init__.py): rebuild the bundle")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        write, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ inside a bundle
        try:
            spec.loader.exec_module(module)
        finally:
            sys.dont_write_bytecode = write
    return sys.modules[name]


def register_plugin(trt, package_dir: Path, namespace: str, arch: int | None) -> dict:
    """Register the HstuAttention creator from package_dir (its cubins/ beside it); returns name, version,
    namespace and where it came from."""
    pkg = import_plugin(package_dir)
    pkg.plugin.register(trt, namespace, Path(package_dir) / "cubins", arch)
    return {"name": pkg.spec.NAME, "version": pkg.spec.VERSION, "namespace": namespace, "package": str(package_dir)}


def _profile_dims(name: str, shape, profile, contextual_len: int) -> tuple[list[int], list[int], list[int]]:
    axes = {"b": profile.batch, "h": profile.history, "c": profile.candidates, "x": (contextual_len,) * 3}
    dims = INPUT_AXES[name][: len(shape)]
    return tuple([axes[d][i] for d in dims] for i in range(3))  # type: ignore[return-value]


def capturing_logger(trt):
    """A TensorRT logger that keeps messages (for error reports) instead of printing them."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.ERROR:
                self.messages.append(msg)

    return Logger()


def parse(trt, logger, onnx_path: Path):
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).splitlines()[0] for i in range(parser.num_errors))
        raise StageError(f"{onnx_path.name}: the TensorRT ONNX parser rejected the graph: {errors}")
    return builder, network, parser


def network_summary(network) -> dict:
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    return {"layers": len(layers), "layer_types": dict(Counter(str(layer.type).split(".")[-1] for layer in layers)),
            "inputs": {network.get_input(i).name: [str(network.get_input(i).dtype).split(".")[-1],
                                                   list(network.get_input(i).shape)] for i in range(network.num_inputs)},
            "outputs": {network.get_output(i).name: str(network.get_output(i).dtype).split(".")[-1]
                        for i in range(network.num_outputs)}}


def _target(trt, config, section) -> str:
    if is_rtx(trt):
        cc = "SM" + section.tensorrt_target_cc.replace(".", "")
        if cc not in trt.ComputeCapability.__members__:
            supported = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
            raise StageError(f"engine.tensorrt_target_cc={section.tensorrt_target_cc}: TensorRT-RTX builds only for "
                             f"{', '.join(supported)}: pick one of those")
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, cc), 0)
        return cc
    return "the build machine's GPU (TensorRT proper targets the GPU it builds on)"


PLUGIN_DIR = Path("plugins") / "hstu_attention"  # the plugin package's copy, relative to the plans' folder


def target_arch(trt, section) -> int:
    """The compute capability a plan (and so the plugin's cubins) is for: the recipe's target with
    TensorRT-RTX; the build machine's GPU with TensorRT proper (it builds for the GPU it runs on)."""
    if not is_rtx(trt):
        try:
            import torch

            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                return 10 * major + minor
        except ImportError:
            pass
    return int(section.tensorrt_target_cc.replace(".", ""))


def ship_plugin(out_dir: Path, arch: int) -> tuple[Path, dict]:
    """Copy the plugin package (its .py files) and its cubins for `arch` into out_dir/plugins/hstu_attention;
    the cubins come from the package when current (compile.is_current), else are compiled now."""
    import shutil
    import time

    from hstu_opt._lazy import require

    src = require("plugins.hstu_attention", backend="tensorrt plugin", extra="plugin")
    src_dir = Path(src.__file__).parent
    dst = out_dir / PLUGIN_DIR
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src_dir.glob("*.py")):
        shutil.copy2(f, dst / f.name)
    compile_mod = importlib.import_module("plugins.hstu_attention.compile")
    cached = src_dir / "cubins" / f"sm_{arch}"
    t0 = time.perf_counter()
    if compile_mod.is_current(cached):
        shutil.copytree(cached, dst / "cubins" / f"sm_{arch}", dirs_exist_ok=True)
        how = f"the package's cubins/sm_{arch} (current for this kernel source)"
    else:
        require("triton", backend="tensorrt plugin (compiling its cubins)", extra="triton")
        compile_mod.compile_arch_in_child(arch, dst / "cubins")
        how = f"compiled now for sm_{arch} ({time.perf_counter() - t0:.1f} s)"
    manifest = json.loads((dst / "cubins" / f"sm_{arch}" / "manifest.json").read_text())
    return dst, {"cubins": how, "arch": arch, "triton": manifest["triton"], "source_sha256": manifest["source_sha256"],
                 "kernels": sorted(manifest["kernels"])}


def build_fused(onnx_path: Path, out_dir: Path, name: str, section, contextual_len: int, namespace: str) -> dict:
    """The fused graph's plan with the HstuAttention plugin (its package shipped beside the plans), built
    in a child process (backends/tensorrt_build.py says why)."""
    from hstu_opt.backends.tensorrt_build import build_with_plugin

    trt = trt_module()
    arch = target_arch(trt, section)
    plugin_dir, shipped = ship_plugin(out_dir, arch)
    desc = build_with_plugin(onnx_path, out_dir, name, section, contextual_len, plugin_dir, namespace, arch)
    desc["plugin"] = desc["plugin"] | {"package": PLUGIN_DIR.as_posix()} | shipped
    return desc


def plugin_layers(trt, network) -> list[dict]:
    """Name, version and namespace of every IPluginV3 layer in the network (what the plan references)."""
    out = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.PLUGIN_V3:
            layer.__class__ = trt.IPluginV3Layer
            core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
            out.append({"layer": layer.name, "name": core.plugin_name, "version": core.plugin_version,
                        "namespace": core.plugin_namespace})
    return out


def build(onnx_path: Path, out_dir: Path, name: str, section, contextual_len: int) -> dict:
    """Build `<name>.plan` (+ `<name>.timing.cache` with TensorRT proper); returns the description."""
    trt = trt_module()
    logger = capturing_logger(trt)
    builder, network, _parser = parse(trt, logger, onnx_path)
    config = builder.create_builder_config()
    target = _target(trt, config, section)
    levels = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_cc": "SAME_COMPUTE_CAPABILITY"}
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, levels[section.tensorrt_hardware_compatibility])
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    profiles = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        mn, opt, mx = _profile_dims(t.name, t.shape, section.profile, contextual_len)
        profile.set_shape(t.name, mn, opt, mx)
        profiles[t.name] = {"min": mn, "opt": opt, "max": mx}
    config.add_optimization_profile(profile)
    timing_cache = None
    if not is_rtx(trt):  # TensorRT-RTX makes timing-cache calls no-ops (it tunes at run time instead)
        timing_cache = config.create_timing_cache(b"")
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise StageError(f"{onnx_path.name}: TensorRT could not build an engine for {target}: "
                         f"{'; '.join(logger.messages[-3:]) or 'no message'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path = out_dir / f"{name}.plan"
    plan_path.write_bytes(memoryview(plan))
    cache_note = "not used: TensorRT-RTX has no build-time timing cache (it tunes kernels at run time)"
    if timing_cache is not None:
        (out_dir / f"{name}.timing.cache").write_bytes(memoryview(config.get_timing_cache().serialize()))
        cache_note = f"{name}.timing.cache"
    plugins = plugin_layers(trt, network)
    for p in plugins:  # the plan stores the plugin by name and fields (not its code)
        p["name_in_plan"] = p["name"].encode() in bytes(memoryview(plan))
    return {"backend": NAME, "module": trt.__name__, "version": trt.__version__, "source": onnx_path.name,
            "plan": plan_path.name, "plugin_layers": plugins, "bytes": plan_path.stat().st_size, "sha256": sha256_file(plan_path),
            "target": target, "hardware_compatibility": section.tensorrt_hardware_compatibility,
            "profiles": profiles, "network": network_summary(network), "timing_cache": cache_note,
            "engine_inspector": inspect_plan(trt, logger, plan)}


def inspect_plan(trt, logger, plan) -> dict:
    """Layer information from the engine inspector; needs a deserialized engine, i.e. a CUDA driver."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    logger.messages.clear()  # the expected "no CUDA driver" errors when there is no GPU
    if engine is None:
        return {"available": False, "why": "deserializing a plan needs a CUDA driver and a GPU of the target's compute "
                                           "capability; none on this machine (network-level layers are recorded instead)"}
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    return {"available": True, "layers": info}


def load(plan_path: Path, plugin_namespace: str = ""):
    """Deserialize a plan (GPU only). Not exercised here: no machine in this workplace can run one. A plan
    built with the HstuAttention plugin finds it registered from the bundle's copy beside the plans
    (its cubins for the GPU it runs on)."""
    trt = trt_module()
    if (plan_path.parent / PLUGIN_DIR).is_dir():
        register_plugin(trt, plan_path.parent / PLUGIN_DIR, plugin_namespace, None)
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise StageError(f"{plan_path}: cannot be deserialized here (needs a GPU of the plan's compute capability)")
    return engine


def run(engine, feed: dict):
    """Run one request on the GPU with torch CUDA tensors as I/O. Not exercised here (see module doc)."""
    import torch

    trt = trt_module()
    ctx = engine.create_execution_context()
    inputs = {k: torch.from_numpy(v).cuda() for k, v in feed.items()}
    for name, t in inputs.items():
        ctx.set_input_shape(name, tuple(t.shape))
        ctx.set_tensor_address(name, t.data_ptr())
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            outputs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            ctx.set_tensor_address(name, outputs[name].data_ptr())
    ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    return {k: v.cpu().numpy() for k, v in outputs.items()}
