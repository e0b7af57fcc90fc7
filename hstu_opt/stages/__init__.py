"""The stages, in pipeline order. Adding a stage = a module here and one line in STAGES."""

from hstu_opt.stages.train_stub import TrainStub

STAGES = [TrainStub()]

__all__ = ["STAGES"]
