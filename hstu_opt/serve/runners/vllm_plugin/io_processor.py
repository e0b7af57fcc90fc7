"""The IO processor (vllm.io_processor_plugins entry point `hstu`): a validated ranking or retrieval
request -> one vLLM prompt plus its PoolingParams; the pooled output -> probabilities or an embedding.

Requests arrive already validated and normalized (hstu_opt.serve.requests builds RankInput/RetrieveInput
for every runner), so parse_data only checks the type. vLLM's IOProcessor.merge_pooling_params sees no
prompt, while an HSTU request's rows do not fit in token ids alone (rows.py): `pooling_params(request)`
builds the per-request params carrying them, and the runner calls it next to pre_process.
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
    def parse_data(self, data: object) -> HstuRequest:
        if not isinstance(data, RankInput | RetrieveInput):
            raise TypeError(f"the hstu IO processor takes a RankInput or RetrieveInput (hstu_opt.serve.requests "
                            f"validates raw JSON into one), not {type(data).__name__}")
        return data

    def pre_process(self, prompt: HstuRequest, request_id: str | None = None, **kwargs) -> TokensPrompt:
        return TokensPrompt(prompt_token_ids=seq_rows(prompt).token_ids())

    def pooling_params(self, request: HstuRequest) -> PoolingParams:
        return PoolingParams(task=TASK, extra_kwargs=seq_rows(request).extra_kwargs())

    def merge_pooling_params(self, params: PoolingParams | None = None) -> PoolingParams:
        return params or PoolingParams(task=TASK)

    def post_process(self, model_output: Sequence[PoolingRequestOutput], request_id: str | None = None,
                     **kwargs) -> np.ndarray:
        """One request's output: probabilities [M, T] (ranking) or the query embedding [D] (retrieval)."""
        (out,) = model_output
        return out.outputs.data.float().numpy()


def seq_rows(request: HstuRequest) -> SeqRows:
    candidates = request.candidates if isinstance(request, RankInput) else np.zeros(0, np.int64)
    return SeqRows.build(request.contextual_ids, request.item_ids, request.ratings, request.timestamps,
                         candidates, request.query_time)
