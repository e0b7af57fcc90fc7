"""The serving user cache: a byte-budgeted store of per-user K/V plus a pluggable eviction policy."""

from hstu_opt.serve.kv_cache.policy import POLICIES, EvictionPolicy, LRUPolicy, PredictivePolicy, make_policy
from hstu_opt.serve.kv_cache.store import CacheKey, CacheStats, KVStore, UserKV, cache_key, history_digest

__all__ = ["CacheKey", "CacheStats", "EvictionPolicy", "KVStore", "LRUPolicy", "POLICIES", "PredictivePolicy",
           "UserKV", "cache_key", "history_digest", "make_policy"]
