"""The stages, in pipeline order. Adding a stage = a module here and one line in STAGES."""

from hstu_opt.stages.export_onnx import ExportOnnx
from hstu_opt.stages.bench import Bench
from hstu_opt.stages.build_engine import BuildEngine
from hstu_opt.stages.calibrate_int8 import CalibrateInt8
from hstu_opt.stages.fuse import Fuse
from hstu_opt.stages.train_stub import TrainStub

STAGES = [TrainStub(), ExportOnnx(), Fuse(), CalibrateInt8(), BuildEngine(), Bench()]

__all__ = ["STAGES"]
