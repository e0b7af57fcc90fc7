"""A Python client for `hstu-opt serve` that takes the fast paths for you (docs/serving.md, "Python client").

    from hstu_opt.serve.client import RankClient
    with RankClient("http://127.0.0.1:8000") as client:
        r = client.rank(candidates, user_id="alice", item_ids=ids, timestamps=ts, ratings=ratings)
        r.item_ids, r.scores["watched"]          # numpy arrays, best first; r.cache: "hit" | "miss" | "off"

Every request sends its integer arrays raw after the JSON (a binary body, docs/serving.md "Binary bodies";
`arrays="packed"`: base64 in the JSON) and asks for packed results (base64 columns). A
user's second request with the same history, contextual ids and query-time step goes by `history_ref`
(the server does not receive or parse the history again); a 409 (the cache dropped it) is answered by
sending the history, transparently. The client keys a reference by a digest of exactly what it sent, so a
changed history, or a query time in another `serving.time_granularity_s` step, never reuses an old one.

HTTP goes through the standard library's http.client, one keep-alive connection per thread, each request
in one write (headers and body together, TCP_NODELAY). httpx writes them apart with its own Python in
between, and the server, which starts on the headers, waits for the body: on the 2-core CPU machine
0.08-0.11 ms of every request, and a round trip of 0.67-0.74 ms against 0.27-0.32 ms (docs/serving.md,
"Python client"). Apart, a small body can also sit behind Nagle's algorithm until the server acknowledges
the headers (delayed ACKs: tens of ms across a network). Share one client between threads freely: each
thread gets its own connection and the reference table takes a lock.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pybase64

from hstu_opt.serve.cache_keys import history_digest
from hstu_opt.serve.requests import pack_int64
from hstu_opt.serve.schemas import BINARY_FIELDS, BINARY_HEADER

ArrayForm = Literal["binary", "packed", "list"]


def encode_request(body: dict, arrays: ArrayForm = "binary") -> tuple[bytes, dict[str, str]]:
    """A rank or retrieve request (its integer arrays as lists or numpy arrays) -> (the body to send, its
    headers). "binary": the fields in BINARY_FIELDS after the JSON as raw little-endian int64, each given
    in the JSON by its binary_data_size, the JSON's length in the Inference-Header-Content-Length header;
    "packed": those arrays as base64 strings in the JSON; "list": plain JSON lists."""
    doc = {**body, **({"history": dict(body["history"])} if body.get("history") is not None else {})}
    raw: list[bytes] = []
    for path in BINARY_FIELDS if arrays != "list" else ():
        parent, _, name = path.rpartition(".")
        node = doc.get(parent) if parent else doc
        values = node.get(name) if node is not None else None
        if values is None or isinstance(values, str):  # (absent, or already packed)
            continue
        if arrays == "packed":
            node[name] = pack_int64(values)
        else:
            raw.append(np.ascontiguousarray(values, "<i8").tobytes())
            node[name] = {"binary_data_size": len(raw[-1])}
    head = json.dumps(doc, separators=(",", ":"), default=_plain).encode()
    if not raw:
        return head, {"content-type": "application/json"}
    return head + b"".join(raw), {"content-type": "application/octet-stream", BINARY_HEADER: str(len(head))}


def _plain(value):
    """json.dumps' fallback: numpy arrays and integers as JSON lists and numbers."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def unpack_results(packed: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A rank response's `packed` results -> (item ids int64 [M], {task: float32 [M]}), best first (writable
    arrays, as np.asarray of the other layouts' lists would be)."""
    def arr(text: str, dtype: str) -> np.ndarray:
        return np.frombuffer(bytearray(pybase64.b64decode(text)), dtype=dtype)

    return arr(packed["item_id"], "<i8"), {t: arr(v, "<f4") for t, v in packed["scores"].items()}


class RankError(Exception):
    """The server answered a rank request with an error: its status, the field it names, its request id."""

    def __init__(self, status: int, body: dict):
        super().__init__(f"{status}: {body.get('error', body)}")
        self.status, self.field, self.request_id = status, body.get("field"), body.get("request_id")


@dataclass
class Ranking:
    item_ids: np.ndarray  # [M] int64, best first (by the first task)
    scores: dict[str, np.ndarray]  # task -> [M] float32 (the engine's values), in item_ids' order
    cache: str  # "hit" | "miss" | "off"
    truncated: bool
    by_reference: bool  # sent as a history_ref
    timing_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class ClientStats:
    requests: int = 0
    by_reference: int = 0
    references_gone: int = 0  # 409s answered by sending the history


@dataclass
class Reply:
    status_code: int
    content: bytes

    def json(self) -> dict:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class _OneWrite:
    """http.client's connection, with a bytes body sent in the same write as the headers (http.client sends
    them in two; its own comment on Nagle and delayed ACKs says why one is better) and Nagle off."""

    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send_output(self, message_body=None, encode_chunked=False):
        if isinstance(message_body, bytes) and isinstance(getattr(self, "_buffer", None), list):
            self._buffer.extend((b"", b""))
            head = b"\r\n".join(self._buffer)
            del self._buffer[:]
            return self.send(head + message_body)
        return super()._send_output(message_body, encode_chunked=encode_chunked)


class _HTTP(_OneWrite, http.client.HTTPConnection):
    pass


class _HTTPS(_OneWrite, http.client.HTTPSConnection):
    pass


class Connections:
    """Keep-alive HTTP/1.1 connections to one server, one per thread (http.client's are not thread-safe),
    each request written in one send (_OneWrite). A request on a
    kept-alive connection the server has meanwhile closed is sent again once on a new one: a rank request
    only reads the model, so sending it twice changes nothing but the cache's counters."""

    def __init__(self, base_url: str, timeout: float):
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url {base_url!r}: give http://HOST:PORT (or https://)")
        self._cls = _HTTPS if url.scheme == "https" else _HTTP
        self._host, self._port, self._prefix = url.hostname, url.port, url.path.rstrip("/")
        self.timeout = timeout
        self._local = threading.local()
        self._open: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
        for retry in (False, True):
            conn = self._conn()
            try:
                conn.request(method, self._prefix + path, body=body, headers=headers or {})
                r = conn.getresponse()
                return Reply(r.status, r.read())
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop(conn)
                if retry:
                    raise
            except BaseException:
                self._drop(conn)  # (a timeout or an interrupt leaves the connection mid-response)
                raise
        raise AssertionError("unreachable")

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._cls(self._host, self._port, timeout=self.timeout)
            with self._lock:
                self._open.append(conn)
        return conn

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        self._local.conn = None
        with self._lock:
            if conn in self._open:
                self._open.remove(conn)

    def close(self) -> None:
        with self._lock:
            for conn in self._open:
                conn.close()
            self._open.clear()
        self._local = threading.local()


class RankClient:
    def __init__(self, base_url: str, *, timeout: float = 30.0, use_references: bool = True, max_references: int = 100_000,
                 arrays: ArrayForm = "binary"):
        self._http = Connections(base_url, timeout)
        self.arrays = arrays  # how requests carry their integer arrays (encode_request)
        self.use_references, self.max_references = use_references, max_references
        self._refs: OrderedDict[tuple, str] = OrderedDict()  # (user, digest of what was sent, time step) -> ref
        self._lock = threading.Lock()
        self._model: dict | None = None
        self.stats = ClientStats()

    def __enter__(self) -> RankClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def model(self) -> dict:
        """GET /v1/model (fetched once): name, version, tasks, limits, engine."""
        if self._model is None:
            r = self._http.request("GET", "/v1/model")
            if r.status_code != 200:
                raise RankError(r.status_code, _json(r))
            self._model = r.json()
        return self._model

    def rank(self, candidates, *, item_ids, timestamps, user_id: str | None = None, ratings=None,
             query_time: int | None = None, contextual_ids=None) -> Ranking:
        """Scores of every candidate for the user with this history (oldest first), best first."""
        ids, ts = np.asarray(item_ids, np.int64), np.asarray(timestamps, np.int64)
        rt = None if ratings is None else np.asarray(ratings, np.int64)
        ctx = None if contextual_ids is None else [int(c) for c in contextual_ids]
        cands = np.asarray(candidates, np.int64)
        key = self._key(user_id, ids, rt, ts, query_time, ctx) if self.use_references and ids.size and ts.size else None
        ref = self._ref(key)
        self.stats.requests += 1
        if ref is not None:
            r = self._post({"user_id": user_id, "history_ref": ref, "candidates": cands})
            if r.status_code != 409:
                self.stats.by_reference += 1
                return self._answer(r, key, by_reference=True)
            self.stats.references_gone += 1
            self._forget(key)
        history = {"item_ids": ids, "ratings": rt, "timestamps": ts}
        body = {"user_id": user_id, "history": history, "candidates": cands, "query_time": query_time,
                "contextual_ids": ctx}
        return self._answer(self._post(body), key, by_reference=False)

    # ---- internals ------------------------------------------------------------------------------------
    def _post(self, body: dict):
        content, headers = encode_request({**body, "results_layout": "packed"}, self.arrays)
        return self._http.request("POST", "/v1/rank", content, headers)

    def _answer(self, r, key: tuple | None, by_reference: bool) -> Ranking:
        body = _json(r)
        if r.status_code != 200:
            raise RankError(r.status_code, body)
        if key is not None and body.get("history_ref"):
            with self._lock:
                self._refs[key] = body["history_ref"]
                self._refs.move_to_end(key)
                while len(self._refs) > self.max_references:
                    self._refs.popitem(last=False)
        item_ids, scores = unpack_results(body["packed"])
        return Ranking(item_ids, scores, body["cache"], body["truncated"], by_reference, body.get("timing_ms", {}))

    def _key(self, user_id, ids, ratings, ts, query_time, ctx) -> tuple:
        """What a reference stands for, as this client sent it: the user, a digest of the history rows and
        contextual ids, and the query time's step (the server floors it to time_granularity_s)."""
        digest = history_digest(ids, np.zeros(0, np.int64) if ratings is None else ratings, ts,
                                None if ctx is None else np.asarray(ctx, np.int64))
        step = int(self.model()["limits"]["time_granularity_s"])
        t = int(ts[-1]) if query_time is None else int(query_time)
        return user_id, digest, t - t % step

    def _ref(self, key: tuple | None) -> str | None:
        if key is None:
            return None
        with self._lock:
            return self._refs.get(key)

    def _forget(self, key: tuple) -> None:
        with self._lock:
            self._refs.pop(key, None)


def _json(r: Reply) -> dict:
    try:
        return r.json()
    except ValueError:
        return {"error": r.text[:200]}
