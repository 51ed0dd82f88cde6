"""``engram.offload``: the public name of :mod:`engram.storage.offload` (the same module object).

``engram.offload`` is both this module (``from engram.offload import DiskMultiHeadEmbedding``)
and the function (``engram.offload(model, "disk", path=...)``): whichever a user touches first
becomes the attribute of ``engram``, so the module is made callable as the function.
"""

import sys
import types

from engram.storage import offload as _impl


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _impl.offload(*args, **kwargs)


_impl.__class__ = _CallableModule
sys.modules[__name__] = _impl
