from hispec.kv.cache import KVCache

__all__ = ["KVCache"]
