from .interface import ahn_attention, ahn_decode  # noqa: F401
from . import reference  # noqa: F401
from . import decode_meta  # noqa: F401  (fake impl of torch.ops.ahn.decode_step)
from . import prefill  # noqa: F401  (registers torch.ops.ahn.prefill_fwd, prefill_cache and prefill_bwd)
