from hispec.kv.budget import KVLayout, available_memory, kv_bytes_per_token, plan_kv_cache
from hispec.kv.cache import KVCache

__all__ = ["KVCache", "KVLayout", "available_memory", "kv_bytes_per_token", "plan_kv_cache"]
