"""The AHN parameters of one decoder layer, named as in the published checkpoints.

Each layer of an AHN model holds ``layer.ahn.fn``, a small module whose parameters
are the per-head gate projections and the memory epilogue (docs/AHN_SPEC.md,
"Checkpoint format"). The module computes no attention itself: it turns the
layer's pre-normed hidden state ``x`` into the raw gates ``a, b, z`` that
:func:`ahn_ops.ahn_attention` expects, and hands over its parameters.

Shapes per kind (``hidden`` model width, ``H`` query heads, ``D`` head dim)::

    gdn:    a_proj.weight [H, hidden], b_proj.weight [H, hidden], g_proj.weight [H, hidden],
            A_log [H], D [H] (unused), dt_bias [H], o_norm.weight [D], o_proj.weight [H, D, D]
    dn:     b_proj.weight, g_proj.weight, o_norm.weight [D], o_proj.weight [H, D, D]
    mamba2: dt_proj.weight [H, hidden], dt_proj.bias [H], g_proj.weight, g_proj.bias,
            A_log [H], dt_bias [H], norm.weight [H*D], o_proj.weight [H, D, D]
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

KIND_TO_IMPL = {"gdn": "GatedDeltaNet", "dn": "DeltaNet", "mamba2": "Mamba2"}
IMPL_TO_KIND = {v: k for k, v in KIND_TO_IMPL.items()}


def normalize_kind(kind: str) -> str:
    """Accept ``"gdn" | "dn" | "mamba2"`` or the checkpoint names ``"GatedDeltaNet" | "DeltaNet" | "Mamba2"``."""
    if kind in KIND_TO_IMPL:
        return kind
    if kind in IMPL_TO_KIND:
        return IMPL_TO_KIND[kind]
    low = str(kind).lower()
    for k, v in KIND_TO_IMPL.items():
        if low in (k, v.lower()):
            return k
    raise ValueError(f"kind must be one of {tuple(KIND_TO_IMPL)} (or {tuple(IMPL_TO_KIND)}), got {kind!r}")


class GroupLinear(nn.Module):
    """Per-head ``[D, D]`` projection without bias: ``y[..., h, :] = x[..., h, :] @ weight[h]``."""

    def __init__(self, num_heads: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads, head_dim, head_dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...hd,hde->...he", x, self.weight)


class AHNNorm(nn.Module):
    """Holder of a norm weight (the epilogue norm runs inside the fused op)."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))


def _init_decay_(A_log: torch.Tensor, dt_bias: torch.Tensor, A_range=(0.0, 16.0), dt_min=1e-3, dt_max=0.1,
                 dt_floor=1e-4) -> None:
    """GatedDeltaNet / Mamba2 initialisation: ``A ~ U(A_range)``, ``dt ~ logU(dt_min, dt_max)``,
    ``dt_bias = softplus^-1(dt)`` so that ``softplus(dt_bias)`` starts in ``[dt_min, dt_max]``."""
    if A_log.is_meta:
        return
    with torch.no_grad():
        A = torch.empty(A_log.shape, dtype=torch.float32, device=A_log.device).uniform_(*A_range)
        A_log.copy_(torch.log(A.clamp_min(1e-4)))
        dt = torch.exp(torch.rand(dt_bias.shape, dtype=torch.float32, device=dt_bias.device)
                       * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp_min(dt_floor)
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class AHNFunction(nn.Module):
    """Base of the three kinds: ``gates(x) -> (a, b, z)`` and ``op_params() -> dict``."""

    kind: str = ""

    def gates(self, x: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def op_params(self) -> Dict[str, Optional[torch.Tensor]]:
        raise NotImplementedError

    def gate_linears(self) -> Tuple[Optional[nn.Linear], Optional[nn.Linear], nn.Linear]:
        """The ``nn.Linear`` behind each of ``gates(x)``'s outputs (None where that output is None): the
        fast decoder stacks them with k/v into one projection."""
        raise NotImplementedError


class GatedDeltaNetAHN(AHNFunction):
    kind = "gdn"

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        H, D = num_heads, head_dim
        self.num_heads, self.head_dim = H, D
        fk = dict(device=device, dtype=dtype)
        self.a_proj = nn.Linear(hidden_size, H, bias=False, **fk)
        self.b_proj = nn.Linear(hidden_size, H, bias=False, **fk)
        self.g_proj = nn.Linear(hidden_size, H, bias=False, **fk)
        self.A_log = nn.Parameter(torch.zeros(H, **fk))
        self.D = nn.Parameter(torch.ones(H, **fk))  # in the checkpoints, unused by the model
        self.dt_bias = nn.Parameter(torch.zeros(H, **fk))
        self.o_norm = AHNNorm(D, **fk)
        self.o_proj = GroupLinear(H, D, **fk)
        _init_decay_(self.A_log, self.dt_bias)

    def gates(self, x):
        return self.a_proj(x), self.b_proj(x), self.g_proj(x)

    def gate_linears(self):
        return self.a_proj, self.b_proj, self.g_proj

    def op_params(self):
        return dict(A_log=self.A_log, dt_bias=self.dt_bias, norm_weight=self.o_norm.weight,
                    o_weight=self.o_proj.weight)


class DeltaNetAHN(AHNFunction):
    kind = "dn"

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        H, D = num_heads, head_dim
        self.num_heads, self.head_dim = H, D
        fk = dict(device=device, dtype=dtype)
        self.b_proj = nn.Linear(hidden_size, H, bias=False, **fk)
        self.g_proj = nn.Linear(hidden_size, H, bias=False, **fk)
        self.o_norm = AHNNorm(D, **fk)
        self.o_proj = GroupLinear(H, D, **fk)

    def gates(self, x):
        return None, self.b_proj(x), self.g_proj(x)

    def gate_linears(self):
        return None, self.b_proj, self.g_proj

    def op_params(self):
        return dict(A_log=None, dt_bias=None, norm_weight=self.o_norm.weight, o_weight=self.o_proj.weight)


class Mamba2AHN(AHNFunction):
    kind = "mamba2"

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        H, D = num_heads, head_dim
        self.num_heads, self.head_dim = H, D
        fk = dict(device=device, dtype=dtype)
        self.dt_proj = nn.Linear(hidden_size, H, bias=True, **fk)
        self.g_proj = nn.Linear(hidden_size, H, bias=True, **fk)
        self.A_log = nn.Parameter(torch.zeros(H, **fk))
        self.dt_bias = nn.Parameter(torch.zeros(H, **fk))
        self.norm = AHNNorm(H * D, **fk)
        self.o_proj = GroupLinear(H, D, **fk)
        _init_decay_(self.A_log, self.dt_bias, A_range=(1.0, 16.0))
        if not self.dt_proj.bias.is_meta:
            with torch.no_grad():  # dt_bias carries the offset; the projection's own bias starts at 0
                self.dt_proj.bias.zero_()

    def gates(self, x):
        return self.dt_proj(x), None, self.g_proj(x)

    def gate_linears(self):
        return self.dt_proj, None, self.g_proj

    def op_params(self):
        return dict(A_log=self.A_log, dt_bias=self.dt_bias, norm_weight=self.norm.weight,
                    o_weight=self.o_proj.weight)


_CLASSES = {"gdn": GatedDeltaNetAHN, "dn": DeltaNetAHN, "mamba2": Mamba2AHN}


class AHNBlock(nn.Module):
    """``layer.ahn``: holds ``fn`` so that parameter names read ``model.layers.{i}.ahn.fn.<name>``."""

    def __init__(self, kind: str, hidden_size: int, num_heads: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        self.kind = normalize_kind(kind)
        self.fn = _CLASSES[self.kind](hidden_size, num_heads, head_dim, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def ahn_param_shapes(kind: str, hidden_size: int, num_heads: int, head_dim: int) -> Dict[str, Tuple[int, ...]]:
    """Names (relative to ``ahn.fn.``) and shapes of one layer's AHN parameters."""
    blk = AHNBlock(kind, hidden_size, num_heads, head_dim, device="meta")
    return {n: tuple(p.shape) for n, p in blk.fn.named_parameters()}


def count_ahn_params(kind: str, hidden_size: int, num_heads: int, head_dim: int, num_layers: int,
                     fa_layer_ids=()) -> int:
    """Parameters added by AHN to a model (built on the meta device, nothing allocated)."""
    per_layer = sum(math.prod(s) for s in ahn_param_shapes(kind, hidden_size, num_heads, head_dim).values())
    return per_layer * (num_layers - len(set(fa_layer_ids)))
