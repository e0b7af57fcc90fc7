"""The serving user cache: per-user K/V in page pools (paged.py; the byte-budgeted KVStore before it) plus a
pluggable eviction policy."""

from hstu_opt.serve.kv_cache.policy import POLICIES, EvictionPolicy, LRUPolicy, PredictivePolicy, make_policy
from hstu_opt.serve.kv_cache.paged import DEFAULT_PAGE_ROWS, PagedKV, PagedKVStore, PagePool, PageShape
from hstu_opt.serve.cache_keys import CacheKey, cache_key, history_digest, history_ref, parse_history_ref
from hstu_opt.serve.kv_cache.store import CacheStats, KVStore, UserKV

__all__ = ["DEFAULT_PAGE_ROWS", "PageShape", "PagePool", "PagedKV", "PagedKVStore", "CacheKey", "CacheStats", "EvictionPolicy", "KVStore", "LRUPolicy", "POLICIES", "PredictivePolicy",
           "UserKV", "cache_key", "history_digest", "history_ref", "make_policy", "parse_history_ref"]
