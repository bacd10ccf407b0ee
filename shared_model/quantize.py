"""Dynamic int8 for serving: the MLP layers that run once per (user, item) pair, in int8.

In :meth:`HistoryMLP.score_all` the first MLP layer is split into a per-item half (precomputed at load,
fp32) and a per-user half (one small matvec), so the work of a request is the layers *after* the first
one, applied to a (B, N, h1) tensor. Those are the layers this module replaces: weights quantized once
per output channel to int8, activations quantized per row at call time ("dynamic"), an int8 × int8 →
int32 matmul, then one rescale back to fp32.

``torch.ao.quantization.quantize_dynamic`` and quantized tensors are deprecated in the torch we pin
(they warn on every call), so the arithmetic is written out here on plain int8 tensors and
``torch._int_mm``. :func:`quantize_for_serving` refuses (``FedrecError``) where int8 does not apply:
a model with no hidden layer after the first, a non-CPU model, or a torch without a working int8 matmul.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from fedrec.shared_model.artifacts import LoadedModel
from fedrec.shared_model.errors import FedrecError
from fedrec.shared_model.model import HistoryMLP

#: Symmetric int8 range (−127..127: keeps zero exact and the range symmetric).
QMAX = 127.0


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of a 2-D float tensor: (int8 (R, C), scale (R, 1)); x ≈ q · scale."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / QMAX  # (R, 1)
    q = torch.round(x / scale).clamp(-QMAX, QMAX).to(torch.int8)  # (R, C)
    return q, scale


class Int8DynamicLinear(nn.Module):
    """``nn.Linear`` with int8 weights (per output channel) and int8 activations (per row, per call)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.q_weight_t: torch.Tensor  # (in, out) int8 — buffers, declared for the type checker
        self.w_scale: torch.Tensor  # (1, out)
        self.bias: torch.Tensor  # (out,)
        w = linear.weight.detach().float()  # (out, in)
        q_w, w_scale = _quantize_rows(w)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("q_weight_t", q_w.t().contiguous())  # (in, out) int8
        self.register_buffer("w_scale", w_scale.reshape(1, -1))  # (1, out)
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(self.out_features)
        self.register_buffer("bias", bias)  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == self.in_features, f"expected (..., {self.in_features}), got {tuple(x.shape)}"
        lead = x.shape[:-1]
        q_x, x_scale = _quantize_rows(x.reshape(-1, self.in_features))  # (R, in) int8, (R, 1)
        acc = torch._int_mm(q_x, self.q_weight_t)  # (R, out) int32
        y = acc.float() * x_scale * self.w_scale + self.bias  # (R, out)
        return y.reshape(*lead, self.out_features)


def _int8_matmul_works() -> bool:
    """Probe the int8 matmul once (some builds/CPUs lack it)."""
    try:
        out = torch._int_mm(torch.ones(2, 8, dtype=torch.int8), torch.ones(8, 2, dtype=torch.int8))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool((out == 8).all())


def quantize_for_serving(loaded: LoadedModel) -> LoadedModel:
    """A copy of ``loaded`` whose per-pair MLP layers (all Linear layers after the first) run in int8.

    The first layer stays fp32 on purpose: ``score_all`` precomputes its item half at load, so it costs
    nothing per request and keeping it exact keeps the item side exact. Raises ``FedrecError`` where
    int8 does not apply (see the module docstring).
    """
    model = loaded.model
    if not isinstance(model, HistoryMLP):
        raise FedrecError(
            f"--int8 does not apply to a {model.cfg.kind} model: it has no MLP layer to quantize "
            "(its scoring is one sparse-row × matrix product)"
        )
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise FedrecError("--int8 applies to CPU serving only; this model is not on the CPU")
    layers = list(model.mlp)
    targets = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear) and i > 0]
    if not targets:
        raise FedrecError(
            "--int8 does not apply to this model: its MLP has no layer after the first "
            "(hidden=()), so nothing runs per (user, item) pair to quantize"
        )
    if not _int8_matmul_works():
        raise FedrecError("--int8 is not available: this torch build has no working int8 matmul on this CPU")
    qmodel = copy.deepcopy(model).eval()
    for i in targets:
        lin = qmodel.mlp[i]
        assert isinstance(lin, nn.Linear)
        qmodel.mlp[i] = Int8DynamicLinear(lin)
    meta = {**loaded.meta, "serving": {"int8": True, "int8_layers": [f"mlp.{i}" for i in targets]}}
    return replace(loaded, model=qmodel, meta=meta)
