"""schemathesis against the live server's /openapi.json: generated requests, valid by the schema
(positive) and not (negative), never get a 5xx, and every response matches the documented status
codes, content types and schemas. Bounded: MAX_EXAMPLES per operation and mode."""

from __future__ import annotations

import re

import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (content_type_conformance, not_a_server_error,  # noqa: E402
                                 response_schema_conformance, status_code_conformance)

MAX_EXAMPLES = 50
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OPERATIONS = {"POST /v1/rank", "POST /v1/retrieve", "GET /healthz", "GET /readyz", "GET /v1/model"}


def fuzz(operation, mode: GenerationMode, base_url: str) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        case.call_and_validate(base_url=base_url, checks=CHECKS)

    run()


def lists_only(node):
    """The published schema with each list-or-packed field reduced to its list form. Generated packed
    strings decode to random int64s, never valid item ids, so a positive run on them cannot reach the engine;
    the packed form's decoding and errors are tested directly (test_parts, test_api)."""
    if isinstance(node, list):
        return [lists_only(n) for n in node]
    if not isinstance(node, dict):
        return node
    alts = node.get("oneOf", [])
    if any(a.get("contentEncoding") == "base64" for a in alts):
        listed = next(a for a in alts if a.get("type") == "array")
        return {**{k: v for k, v in node.items() if k != "oneOf"}, **lists_only(listed)}
    return {k: lists_only(v) for k, v in node.items()}


def by_history(doc: dict) -> dict:
    """A rank request that sends its history: a generated history_ref never names a cached entry (409), so
    a positive run that may leave the history out for one rarely reaches the engine; references are tested
    directly (test_history_ref)."""
    rank = doc["components"]["schemas"]["RankRequest"]
    rank["properties"].pop("history_ref")
    rank["properties"]["history"] = {"$ref": "#/components/schemas/History"}
    rank["required"] = [*rank.get("required", []), "history"]
    return doc


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_api_conforms_to_its_schema(live, mode):
    doc = httpx.get(f"{live.url}/openapi.json").json()
    schemas = [schemathesis.openapi.from_dict(doc)]
    if mode == GenerationMode.POSITIVE:
        schemas.append(schemathesis.openapi.from_dict(by_history(lists_only(doc))))
    for schema in schemas:
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} == OPERATIONS
        for op in operations:
            if mode == GenerationMode.NEGATIVE and not len(op.body):
                continue  # (an operation without inputs has no invalid requests)
            fuzz(op, mode, live.url)
    if mode == GenerationMode.POSITIVE:  # the published bounds let generated requests reach the engine
        metrics = httpx.get(f"{live.url}/metrics").text
        assert re.search(r'^hstu_serve_requests_total\{route="/v1/rank",status="200"\} [1-9]', metrics, re.M), metrics

