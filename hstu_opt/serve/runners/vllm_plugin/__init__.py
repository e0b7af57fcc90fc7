"""vLLM's hooks into hstu-opt, declared as entry points in pyproject.toml and loaded by vLLM itself.

  vllm.general_plugins      hstu_opt = register      (every vLLM process): the HSTU model class and its
                                                      config type, so vLLM can build the model of a bundle
  vllm.io_processor_plugins hstu = io_processor      (the serving process): the IOProcessor that turns a
                                                      ranking request into a prompt and pooled output into
                                                      per-candidate probabilities

Nothing here imports vllm or transformers until vLLM calls a hook.
"""

from __future__ import annotations

ARCHITECTURE = "HstuForRanking"  # config.json "architectures"
MODEL_TYPE = "hstu_opt"  # config.json "model_type"
IO_PROCESSOR = "hstu"  # config.json "io_processor_plugin": the entry point name below


def register() -> None:
    """vllm.general_plugins hook. vLLM may call it more than once per process: both calls are idempotent."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from hstu_opt.serve.runners.vllm_plugin.config import HstuVllmConfig

    AutoConfig.register(MODEL_TYPE, HstuVllmConfig, exist_ok=True)
    # A "module:class" string: vLLM imports the model (and torch ops) only when it builds it.
    ModelRegistry.register_model(ARCHITECTURE, "hstu_opt.serve.runners.vllm_plugin.model:HstuForRanking")


def io_processor() -> str:
    """vllm.io_processor_plugins hook: the qualified name of the processor class."""
    return "hstu_opt.serve.runners.vllm_plugin.io_processor.HstuIOProcessor"
