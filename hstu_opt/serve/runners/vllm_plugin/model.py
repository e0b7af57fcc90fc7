"""hstu-opt's HSTU model as a vLLM out-of-tree pooling model (registered by vllm_plugin.register).

What runs where:
  * load_weights: vLLM's default loader reads the bundle's checkpoint (model.safetensors, linked into the
    model directory the runner writes) and hands the tensors here; they load into an unchanged HstuModel
    with the same name and shape checks as hstu_opt.model.checkpoint.
  * forward: vLLM calls it with the step's flat token ids and positions only. HSTU needs more per row
    (rating, timestamp) and per request (query time, candidate count) than that, and vLLM hands per-request
    data to the pooler only (PoolingMetadata.pooling_params), so forward returns an empty per-token tensor.
  * HstuPooler: once per engine step, the requests whose prompt completed in that step are packed into
    one jagged batch and run through HstuModel.rank_jagged (ranking) or forward_jagged (retrieval).
    Whatever requests vLLM's scheduler put in a step are scored together: that is the continuous batching.

The model is attention-free as far as vLLM knows: HSTU's pointwise SiLU attention is not vLLM's softmax
attention, so vLLM allocates no KV cache for it and hstu-opt's ops compute the attention.
"""

from __future__ import annotations

from collections.abc import Iterable, Set

import numpy as np
import torch
from torch import Tensor, nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.pooler import Pooler, PoolingParamsUpdate
from vllm.model_executor.models.interfaces import IsAttentionFree
from vllm.model_executor.models.interfaces_base import attn_type
from vllm.v1.outputs import PoolerOutput
from vllm.v1.pool.metadata import PoolingMetadata

from hstu_opt.model.checkpoint import load_state_checked
from hstu_opt.model.config import HstuConfig
from hstu_opt.model.heads import l2_normalize
from hstu_opt.model.hstu import HstuModel
from hstu_opt.serve.runners.vllm_plugin.rows import SeqRows

TASK = "plugin"  # vLLM's pooling task for models whose inputs and outputs an IO processor defines


@attn_type("attention_free")
class HstuForRanking(nn.Module, IsAttentionFree):
    is_pooling_model = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        cfg = HstuConfig.from_dict(vllm_config.model_config.hf_config.hstu)
        self.hstu = HstuModel(cfg).eval()
        self.pooler = HstuPooler(self.hstu)

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return input_ids.new_empty((input_ids.shape[0], 0), dtype=torch.float32)

    def forward(self, input_ids: Tensor, positions: Tensor, intermediate_tensors=None,
                inputs_embeds: Tensor | None = None, **kwargs) -> Tensor:
        return self.embed_input_ids(input_ids)  # [num_tokens, 0]: HSTU runs in the pooler (module docstring)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        state = dict(weights)
        load_state_checked(self.hstu, state, "vLLM model directory (the bundle's train-stub checkpoint)")
        return {f"hstu.{name}" for name in state}


class HstuPooler(Pooler):
    def __init__(self, model: HstuModel):
        super().__init__()
        self._model = [model]  # a list, not a submodule: the weights belong to HstuForRanking.hstu

    @property
    def model(self) -> HstuModel:
        return self._model[0]

    def get_supported_tasks(self) -> Set[str]:
        return {TASK}

    def get_pooling_updates(self, task: str) -> PoolingParamsUpdate:
        return PoolingParamsUpdate(requires_token_ids=True)  # the row ids, per request, on the CPU

    @torch.inference_mode()
    def forward(self, hidden_states: Tensor, pooling_metadata: PoolingMetadata) -> PoolerOutput:
        finished = pooling_metadata.get_pooling_cursor().get_finished_mask()
        token_ids = pooling_metadata.get_prompt_token_ids_cpu()
        seqs = [SeqRows.from_request(ids, p.extra_kwargs) if done else None
                for ids, p, done in zip(token_ids, pooling_metadata.pooling_params, finished)]
        out: list[Tensor | None] = [None] * len(seqs)
        ranked = [i for i, s in enumerate(seqs) if s is not None and s.num_targets > 0]
        retrieved = [i for i, s in enumerate(seqs) if s is not None and s.num_targets == 0]
        if ranked:
            probs = rank(self.model, [seqs[i] for i in ranked])
            for i, p in zip(ranked, probs.split([seqs[i].num_targets for i in ranked])):
                out[i] = p  # [M, T]
        if retrieved:
            for i, e in zip(retrieved, retrieve(self.model, [seqs[i] for i in retrieved])):
                out[i] = e  # [D]
        return out


def pack(seqs: list[SeqRows]) -> dict[str, Tensor]:
    """Jagged tensors for a list of sequences (HSTU.md "Jagged layout")."""
    lengths = np.array([len(s.ids) for s in seqs], np.int64)
    return {
        "ids": torch.from_numpy(np.concatenate([s.ids for s in seqs])),
        "ratings": torch.from_numpy(np.concatenate([s.ratings for s in seqs])),
        "timestamps": torch.from_numpy(np.concatenate([s.timestamps for s in seqs])),
        "offsets": torch.from_numpy(np.r_[0, np.cumsum(lengths)].astype(np.int64)),
        "num_targets": torch.tensor([s.num_targets for s in seqs], dtype=torch.int64),
        "query_time": torch.tensor([s.query_time for s in seqs], dtype=torch.int64),
    }


def rank(model: HstuModel, seqs: list[SeqRows]) -> Tensor:
    """Task probabilities [sum M, T] of every sequence's candidate rows, in order."""
    batch = pack(seqs)
    ends = batch["offsets"][1:]
    is_target = torch.zeros(len(batch["ids"]), dtype=torch.bool)
    for end, m in zip(ends.tolist(), batch["num_targets"].tolist()):
        is_target[end - m:end] = True
    target_rows, history_rows = is_target.nonzero()[:, 0], (~is_target).nonzero()[:, 0]
    return model.rank_jagged(**batch, target_rows=target_rows, history_rows=history_rows)


def retrieve(model: HstuModel, seqs: list[SeqRows]) -> Tensor:
    """L2-normalized query embeddings [B, D]: each sequence's last (history) row, as HstuModel.retrieve."""
    batch = pack(seqs)
    states, _ = model.forward_jagged(**batch)
    return l2_normalize(states.index_select(0, batch["offsets"][1:] - 1).float())
