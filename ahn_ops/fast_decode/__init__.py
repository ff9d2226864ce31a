"""Fast decoding for AHN models: ``ahn_ops.generate``, one static decode step, CUDA-graph replay.

* :mod:`.generation`: :func:`generate` (prefill, then one static step per token, a CUDA graph on the GPU)
  and :func:`prefill` (a prompt into an :class:`~ahn_ops.AHNModelCache`);
* :mod:`.step`: :class:`StaticDecoder`, the step itself over static buffers, in the variant its plan names;
* :mod:`.plan`: :class:`DecodePlan`, what the step fuses at which batch size on which GPU (the one place
  that decides it);
* :mod:`.model_parts`: what the step reads from the patched Qwen2 model.
"""

from .generation import generate, prefill
from .plan import DecodePlan
from .step import StaticDecoder

__all__ = ["generate", "prefill", "StaticDecoder", "DecodePlan"]
