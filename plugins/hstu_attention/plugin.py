"""The TensorRT IPluginV3 for `hstu::HstuAttention` (Python; works with `tensorrt` and `tensorrt_rtx`,
whose bindings expose the V3 interfaces). The classes are made for whichever module the caller passes
(`make_classes(trt)`), so importing this package needs neither. Build-time methods follow spec.py;
enqueue is runtime.Runtime.enqueue.

TensorRT-RTX 1.7.1 imports such plugins through its ONNX parser (undocumented: NVIDIA's RTX porting guide
says plugins are not supported; ../shared/ENVIRONMENT.md "TensorRT here" has what was seen working).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import spec

INT_FIELDS = ("max_seq_len", "contextual_len", "max_attn_len", "min_full_attn_seq_len", "has_targets")


def fields_from_collection(fc) -> dict:
    return {f.name: np.asarray(f.data) for f in fc} if fc is not None else {}


def make_classes(trt, cubin_root: Path, arch: int | None):
    """(Plugin, Creator) classes bound to the TensorRT module `trt`; `arch` is the build target's compute
    capability (None: the current GPU's, at run time)."""
    from .runtime import Runtime

    class HstuAttentionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, attrs: spec.Attributes, namespace: str = ""):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.attrs = attrs
            self.num_outputs = 1
            self.plugin_name, self.plugin_version, self.plugin_namespace = spec.NAME, spec.VERSION, namespace
            self.timing_cache_id = ""
            self.runtime = Runtime(attrs, cubin_root, None)  # run time: the GPU's own cubins

        def get_capability_interface(self, type):
            return self

        def clone(self):
            return HstuAttentionPlugin(self.attrs, self.plugin_namespace)

        # -- build time --
        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            out = trt.DimsExprs(inputs[0])
            for i, e in enumerate(spec.output_shape(inputs[0], inputs[2])):
                out[i] = e
            return [out]

        def supports_format_combination(self, pos, in_out, num_inputs):
            if num_inputs != spec.NUM_INPUTS:
                raise spec.PluginError(f"{spec.NAME}: {num_inputs} inputs, expected {spec.NUM_INPUTS} "
                                       f"({', '.join(spec.INPUT_NAMES)}): re-run the fuse stage")
            if pos == 0:
                dims = list(in_out[0].desc.dims)
                dv = list(in_out[2].desc.dims)[3]
                if dims[3] >= 0 and dv >= 0:
                    spec.check_head_dims(dims[3], dv)
            types = [d.desc.type.name for d in in_out]
            linear = [d.desc.format == trt.TensorFormat.LINEAR for d in in_out]
            return spec.supports(pos, types, linear, arch)

        def configure_plugin(self, inp, out):
            pass

        def get_workspace_size(self, inp, out):
            return 0

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def get_fields_to_serialize(self):
            f = self.attrs.fields()
            items = [trt.PluginField("alpha", np.array([f["alpha"]], np.float32), trt.PluginFieldType.FLOAT32)]
            items += [trt.PluginField(k, np.array([f[k]], np.int32), trt.PluginFieldType.INT32) for k in INT_FIELDS]
            return trt.PluginFieldCollection(items)

        # -- run time --
        def on_shape_change(self, inp, out):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            return self.runtime.enqueue(input_desc, output_desc, inputs, outputs, workspace, stream)

    class HstuAttentionCreator(trt.IPluginCreatorV3One):
        def __init__(self, namespace: str = ""):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = spec.NAME, spec.VERSION, namespace
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField("alpha", np.array([], np.float32), trt.PluginFieldType.FLOAT32)]
                + [trt.PluginField(k, np.array([], np.int32), trt.PluginFieldType.INT32) for k in INT_FIELDS])

        def create_plugin(self, name, fc, phase):
            attrs = spec.Attributes.from_fields(fields_from_collection(fc))
            if arch is not None:
                check_target(cubin_root, arch)
            return HstuAttentionPlugin(attrs, self.plugin_namespace)

    return HstuAttentionPlugin, HstuAttentionCreator


def check_target(cubin_root: Path, arch: int) -> None:
    """The build target's cubins exist (their freshness is the builder's job: compile.ensure)."""
    if not (Path(cubin_root) / f"sm_{arch}" / "manifest.json").is_file():
        raise spec.PluginError(f"{spec.NAME}: no cubins for sm_{arch} in {cubin_root}: compile them with "
                               f"`python -m plugins.hstu_attention.compile --arch {arch}`")


def register(trt, namespace: str = "", cubin_root: Path | None = None, arch: int | None = None):
    """Register the creator with trt's plugin registry (once per namespace); returns it."""
    registry = trt.get_plugin_registry()
    for c in registry.all_creators:
        if c.name == spec.NAME and c.plugin_version == spec.VERSION and c.plugin_namespace == namespace:
            return c
    _, creator_cls = make_classes(trt, Path(cubin_root) if cubin_root else Path(__file__).parent / "cubins", arch)
    creator = creator_cls(namespace)
    registry.register_creator(creator, namespace)
    register.keep = getattr(register, "keep", []) + [creator]  # the registry holds a raw pointer
    return creator
