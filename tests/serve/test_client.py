"""hstu_opt.serve.client.RankClient against a live server: the same scores as a plain JSON request, a
user's repeat goes by history_ref, a changed history or another query-time step does not, and a
reference the cache dropped is answered by sending the history, transparently."""

from __future__ import annotations

import numpy as np
import pytest

from hstu_opt.serve.client import RankClient, RankError
from hstu_opt.serve.settings import ServeSettings
from tests.serve.conftest import start_server, user_body
from tests.serve.test_failures import entry_bytes


@pytest.fixture(scope="module")
def bundle(bundle_path):
    from hstu_opt.serve.served_bundle import ServedBundle

    return ServedBundle.open(bundle_path)


def call(client: RankClient, body: dict, **over):
    h = body["history"]
    kw = dict(user_id=body["user_id"], item_ids=h["item_ids"], timestamps=h["timestamps"], ratings=h["ratings"],
              query_time=body["query_time"]) | over
    return client.rank(body["candidates"], **kw)


def test_client_scores_references_and_changes(live, bundle):
    body = user_body(np.random.default_rng(31), bundle.cfg.num_items, 25, 2 * bundle.cfg.max_targets + 1, user_id="cl")
    with live.client() as c:
        plain = c.post("/v1/rank", json=body).json()
    with RankClient(live.url) as client:
        first = call(client, body)
        again = call(client, body)
        g = bundle.serving.time_granularity_s
        later = call(client, body, query_time=body["query_time"] + g)  # the next time step: its own entry
        changed = call(client, body, item_ids=body["history"]["item_ids"][:-1] + [1],)
        stats = client.stats
    assert first.item_ids.tolist() == [r["item_id"] for r in plain["results"]]
    for task in bundle.cfg.ranking_tasks:
        assert first.scores[task].tolist() == [r["scores"][task] for r in plain["results"]]
        assert again.scores[task].tolist() == first.scores[task].tolist()
    assert first.cache == "hit" and not first.by_reference  # (plain's request stored it; the client had no ref)
    assert again.by_reference and again.cache == "hit"
    assert not later.by_reference and not changed.by_reference and changed.cache == "miss"
    assert stats.requests == 4 and stats.by_reference == 1 and stats.references_gone == 0


def test_client_resends_the_history_when_the_reference_is_gone(bundle_path, bundle):
    page = entry_bytes(bundle, 64)
    s = start_server(ServeSettings(bundle_path, cache_gb=page / 2**30, host_cache_gb=0, cache_page_rows=64))
    rng = np.random.default_rng(32)
    a, b = (user_body(rng, bundle.cfg.num_items, 30, 5, user_id=u) for u in "ab")
    try:
        with RankClient(s.url) as client:
            first = call(client, a)
            call(client, b)  # evicts a (a pool of one page)
            again = call(client, a)
            with pytest.raises(RankError) as err:
                client.rank([0], user_id="a", item_ids=[1], timestamps=[1])
            stats = client.stats
    finally:
        s.stop()
    assert not again.by_reference and again.cache == "miss" and stats.references_gone == 1
    assert again.item_ids.tolist() == first.item_ids.tolist()
    assert all(np.array_equal(again.scores[t], first.scores[t]) for t in first.scores)
    assert err.value.status == 422 and err.value.field == "candidates[0]"


def test_client_writes_each_request_whole(live, bundle, monkeypatch):
    """Headers and body in one send: the server starts the route on the headers, so a body sent apart is
    waited for inside the route's timing (httpx writes them apart)."""
    import http.client

    sends: list[int] = []
    real = http.client.HTTPConnection.send
    monkeypatch.setattr(http.client.HTTPConnection, "send", lambda self, data: (sends.append(len(data)), real(self, data))[1])
    body = user_body(np.random.default_rng(33), bundle.cfg.num_items, 40, 7, user_id="one-write")
    with RankClient(live.url, use_references=False) as client:
        client.model()
        sends.clear()
        ranked = call(client, body)
    arrays = 8 * (3 * 40 + 7)  # item ids, ratings, timestamps and candidates, raw int64
    assert len(sends) == 1 and sends[0] > arrays and len(ranked.item_ids) == 7


def test_client_resends_on_a_connection_the_server_closed():
    """A kept-alive connection the server closed meanwhile: the request goes again on a new one, once."""
    import http.server
    import threading

    class Once(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            payload = b'{"ok": true}'
            self.send_response(200)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            self.close_connection = True  # (without saying so: the client finds out on its next request)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Once)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        from hstu_opt.serve.client import Connections

        conns = Connections(f"http://127.0.0.1:{server.server_address[1]}", timeout=10)
        replies = [conns.request("GET", "/x") for _ in range(3)]
        conns.close()
    finally:
        server.shutdown()
    assert [r.status_code for r in replies] == [200] * 3 and all(r.json() == {"ok": True} for r in replies)


def test_client_rejects_a_url_without_scheme():
    with pytest.raises(ValueError, match="base_url"):
        RankClient("127.0.0.1:8000")
