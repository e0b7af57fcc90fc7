"""The Hugging Face config type vLLM reads from the model directory's config.json.

It carries hstu-opt's own HstuConfig (as `hstu`) and fills the few generic fields vLLM asks every
model for (width, layers, heads, vocab) from it.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from hstu_opt.serve.runners.vllm_plugin import MODEL_TYPE


class HstuVllmConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, hstu: dict | None = None, **kwargs):
        self.hstu = dict(hstu or {})
        self.hidden_size = self.hstu.get("embedding_dim", 0)
        self.num_hidden_layers = self.hstu.get("num_layers", 0)
        self.num_attention_heads = self.hstu.get("num_heads", 1)
        # the prompt's token ids are item ids (history, candidates) and contextual feature ids
        self.vocab_size = max(self.hstu.get("num_items", 0), self.hstu.get("contextual_cardinality", 0)) + 1
        super().__init__(**kwargs)
