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
    return {"backend": NAME, "module": trt.__name__, "version": trt.__version__, "source": onnx_path.name,
            "plan": plan_path.name, "bytes": plan_path.stat().st_size, "sha256": sha256_file(plan_path),
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


def load(plan_path: Path):
    """Deserialize a plan (GPU only). Not exercised here: no machine in this workplace can run one."""
    trt = trt_module()
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
