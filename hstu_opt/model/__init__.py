from hstu_opt.model.config import HstuConfig
from hstu_opt.model.hstu import HstuModel, KVCache

__all__ = ["HstuConfig", "HstuModel", "KVCache"]
