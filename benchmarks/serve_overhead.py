"""The server's own per-request Python work, timed piece by piece in one process (no HTTP, no engine), for
a dlrm-v3-sized request (4096 history rows, 256 candidates, 4 contextual ids): what the served latency
adds to the engine's before any network or queueing. Run it on the machine that serves, next to
serve_load.py, to see which part of the gap is this host's Python. The response (built and serialized) is
timed in each results layout (response_ms: the default items; response_columns_ms, response_packed_ms),
with its size and a client's decoding of it (client_decode_ms: json.loads, and for packed the base64 arrays
into numpy too); sum_ms counts the default.

    python benchmarks/serve_overhead.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hstu_opt.serve import requests  # noqa: E402
from hstu_opt.serve.app import parse_body, rank_response  # noqa: E402
from hstu_opt.serve.client import encode_request, unpack_results  # noqa: E402
from hstu_opt.serve.kv_cache import cache_key, history_ref  # noqa: E402
from hstu_opt.serve.runners.base import RankOutput  # noqa: E402
from hstu_opt.serve.schemas import BINARY_HEADER, ModelRef, RankRequest, RequestLimits  # noqa: E402

# results_layout -> the suffix of its row keys (the default, items, keeps the names of earlier result files)
LAYOUT_SUFFIX = {"items": "", "columns": "_columns", "packed": "_packed"}
LIMITS = RequestLimits(num_items=1_000_000, num_ratings=10, max_history_len=4096, max_targets=256, contextual_len=4,
                       contextual_cardinality=100, time_granularity_s=60)


def bodies(history: int, candidates: int) -> dict[str, tuple[bytes, str | None]]:
    """Each request form -> (its body, its Inference-Header-Content-Length or None)."""
    rng = np.random.default_rng(0)
    body = {"user_id": "u1", "history": {"item_ids": rng.integers(1, 10**6, history).tolist(),
                                         "ratings": rng.integers(0, 5, history).tolist(),
                                         "timestamps": np.sort(rng.integers(1_600_000_000, 1_700_000_000, history)).tolist()},
            "candidates": rng.integers(1, 10**6, candidates).tolist(), "contextual_ids": [1, 2, 3, 4]}
    # a request by reference: the user's history_ref (from an earlier answer) instead of history, query time, contexts
    key = cache_key(requests.rank_input(RankRequest.model_validate(body), LIMITS))
    by_ref = {"user_id": "u1", "history_ref": history_ref(key, False), "candidates": body["candidates"]}
    forms = {"lists": (body, "list"), "packed": (body, "packed"), "packed_by_reference": (by_ref, "packed"),
             "binary": (body, "binary"), "binary_by_reference": (by_ref, "binary")}
    out = {}
    for form, (b, arrays) in forms.items():
        content, headers = encode_request(b, arrays)
        out[form] = content, headers.get(BINARY_HEADER)
    return out


def p50_ms(fn, n: int = 300) -> float:
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3)


def response_keys(inp, out: RankOutput, ref: ModelRef, layout: str) -> dict[str, float]:
    """One results layout: building and serializing the response, its size, and a client's json.loads of it."""
    def respond():
        t = time.perf_counter()
        return rank_response(inp, out, ["watched", "liked"], ref, t, t, t, layout)

    raw, suffix = respond().body, LAYOUT_SUFFIX[layout]
    decode = (lambda: unpack_results(json.loads(raw)["packed"])) if layout == "packed" else (lambda: json.loads(raw))
    return {f"response{suffix}_ms": p50_ms(respond), f"response{suffix}_bytes": len(raw),
            f"client_decode{suffix}_ms": p50_ms(decode)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--history", type=int, default=4096)
    ap.add_argument("--candidates", type=int, default=256)
    args = ap.parse_args()
    rows = []
    probs = np.random.default_rng(1).random((args.candidates, 2)).astype(np.float32)
    ref = ModelRef(name="dlrm-v3-ranking", version="1", engine="compiled")
    for form, (raw, header) in bodies(args.history, args.candidates).items():
        req, binary = parse_body(RankRequest, raw, header)
        inp = requests.rank_input(req, LIMITS, True, binary)
        out = RankOutput(probs, "off", {"queue": 0.1, "batch": 1.0})
        row = {"form": form, "body_bytes": len(raw),
               "parse_ms": p50_ms(lambda: parse_body(RankRequest, raw, header)),
               "checks_ms": p50_ms(lambda: requests.rank_input(req, LIMITS, True, binary)),
               "cache_key_ms": p50_ms(lambda: cache_key(inp)),
               **{k: v for layout in LAYOUT_SUFFIX for k, v in response_keys(inp, out, ref, layout).items()}}
        row["sum_ms"] = row["parse_ms"] + row["checks_ms"] + row["response_ms"]
        rows.append(row)
        print(json.dumps(row))
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    report = {"benchmark": "serve_overhead", "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpu": cpu, "python": platform.python_version()}, "history": args.history,
              "candidates": args.candidates, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve_overhead_{report['date_utc'][:10]}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
