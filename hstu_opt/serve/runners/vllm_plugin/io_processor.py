"""The IO processor (vllm.io_processor_plugins entry point `hstu`): a validated ranking or retrieval
request -> vLLM prompts plus their PoolingParams; the pooled outputs -> probabilities or an embedding.

A ranking request becomes one prompt per group of max_targets candidates ([contextual][history][group],
at most the model's max_seq_len rows, as the native runner's engine rows): the groups are independent
(targets never see each other, HSTU.md) and vLLM's scheduler batches them like any other requests.
A retrieval request is one prompt without candidates.

Requests arrive already validated and normalized (hstu_opt.serve.requests builds RankInput/RetrieveInput
for every runner), so parse_data only checks the type. vLLM's IOProcessor.merge_pooling_params sees no
prompt, while an HSTU row does not fit in a token id alone (rows.py): `pooling_params(request)` builds
the per-prompt params carrying the rest, and the runner calls it next to pre_process.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from vllm.inputs import TokensPrompt
from vllm.outputs import PoolingRequestOutput
from vllm.plugins.io_processors.interface import IOProcessor
from vllm.pooling_params import PoolingParams

from hstu_opt.serve.runners.base import RankInput, RetrieveInput
from hstu_opt.serve.runners.vllm_plugin.model import TASK
from hstu_opt.serve.runners.vllm_plugin.rows import SeqRows

HstuRequest = RankInput | RetrieveInput


class HstuIOProcessor(IOProcessor[HstuRequest, np.ndarray]):
    @property
    def max_targets(self) -> int:
        return self.vllm_config.model_config.hf_config.hstu["max_targets"]

    def parse_data(self, data: object) -> HstuRequest:
        if not isinstance(data, RankInput | RetrieveInput):
            raise TypeError(f"the hstu IO processor takes a RankInput or RetrieveInput (hstu_opt.serve.requests "
                            f"validates an API request into one), not {type(data).__name__}")
        return data

    def pre_process(self, prompt: HstuRequest, request_id: str | None = None, **kwargs) -> list[TokensPrompt]:
        return [TokensPrompt(prompt_token_ids=s.token_ids()) for s in self.sequences(prompt)]

    def pooling_params(self, request: HstuRequest) -> list[PoolingParams]:
        """One per prompt of pre_process, in the same order."""
        return [PoolingParams(task=TASK, extra_kwargs=s.extra_kwargs()) for s in self.sequences(request)]

    def merge_pooling_params(self, params: PoolingParams | None = None) -> PoolingParams:
        return params or PoolingParams(task=TASK)

    def post_process(self, model_output: Sequence[PoolingRequestOutput], request_id: str | None = None,
                     **kwargs) -> np.ndarray:
        """One request's outputs, in prompt order: probabilities [M, T] (ranking) or the query embedding [D]."""
        parts = [out.outputs.data.float().numpy() for out in model_output]
        return parts[0] if parts[0].ndim == 1 else np.concatenate(parts)

    def sequences(self, request: HstuRequest) -> list[SeqRows]:
        if isinstance(request, RetrieveInput):
            return [_rows(request, np.zeros(0, np.int64))]
        c, size = request.candidates, self.max_targets
        return [_rows(request, c[i:i + size]) for i in range(0, len(c), size)]


def _rows(request: HstuRequest, candidates: np.ndarray) -> SeqRows:
    return SeqRows.build(request.contextual_ids, request.item_ids, request.ratings, request.timestamps, candidates,
                         request.query_time)
