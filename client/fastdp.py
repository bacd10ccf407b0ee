"""Per-user clipping in one backward pass ("book-keeping" clipping) for models of Linear and Embedding.

Opacus' ghost clipping runs two backward passes: one to get every sample's gradient norm, a second on the
loss re-weighted by the clip factors. Both passes go through the whole graph. Here one backward pass stops
at the outputs of the parametrised layers; each layer's per-user gradient is a simple function of what
went into it (``x``) and the gradient of what came out (``g``), so the norms *and* the clipped sum come
from those two tensors without a second pass:

* ``nn.Linear`` on (B, *, in): per-user weight gradient ``G_b = g_bᵀ x_b`` (out × in). Small layers
  materialise it (one batched matmul, no more work than the ordinary weight gradient); large ones and
  2-D inputs use the ghost norm ``‖G_b‖² = Σ (x_b x_bᵀ) ⊙ (g_b g_bᵀ)`` and one matmul over the
  re-weighted ``g``.
* ``nn.Embedding`` with ids (B, *): user b's gradient has one row per distinct id of that user, the
  sum of ``g`` over the positions holding that id. Rows are summed by (user, id) pairs (a sort of the
  B·T keys), never materialising a (B, rows, d) tensor; duplicated ids within a user collide into one
  row exactly as in the real gradient. The clipped sum adds those same rows, scaled, into the table.

Clip factor per user ``min(1, C / (‖∇ℓ_b‖ + 1e-6))`` — the same formula as Opacus. Afterwards every
``p.grad`` holds ``Σ_b factor_b · ∇ℓ_b``; noise, scaling and the optimizer step stay with Opacus'
``DPOptimizerFastGradientClipping`` (see ``client/train.py``).

Requirements (checked where cheap): every trainable parameter lives in an ``nn.Linear`` or a plain
``nn.Embedding`` (no ``max_norm``, ``scale_grad_by_freq`` or ``sparse``), each such module runs at most
once per forward, its input's first dimension is the user, and no operation mixes users (no batch norm).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

#: Per-user (out × in) weight gradients of a Linear are materialised up to this many elements in all
#: (B·out·in); beyond it the ghost norm (B·T²·(in+out)) is used instead.
MATERIALIZE_LIMIT = 1 << 24


@dataclass
class _Record:
    """What one layer saw in the current forward pass."""

    module: nn.Module
    inputs: torch.Tensor  # (B, *, in) activations or (B, *) ids
    output: torch.Tensor  # (B, *, out), part of the autograd graph


class FastClipper:
    """Forward hooks on a model's Linear/Embedding layers + :meth:`clipped_backward`.

    Use as a context manager (or call :meth:`remove`) so that no hook outlives the training round.
    """

    def __init__(
        self, model: nn.Module, *, max_grad_norm: float, materialize_limit: int = MATERIALIZE_LIMIT
    ) -> None:
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.max_grad_norm = max_grad_norm
        self.materialize_limit = materialize_limit
        self.layers = _check_supported(model)
        self._records: dict[nn.Module, _Record] = {}
        self._handles: list[RemovableHandle] = [m.register_forward_hook(self._capture) for m in self.layers]

    # ------------------------------------------------------------------ hooks
    def _capture(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return  # evaluation pass: nothing to clip
        if module in self._records:
            raise ValueError(
                f"{type(module).__name__} ran twice in one forward pass; per-user clipping needs each "
                "parametrised layer once (look ids up in one call, e.g. torch.cat([history, candidates]))"
            )
        self._records[module] = _Record(module, args[0].detach(), output)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._records.clear()

    def __enter__(self) -> FastClipper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ clipping
    def clipped_backward(self, per_user_loss: torch.Tensor) -> torch.Tensor:
        """Accumulate ``Σ_b clip_C(∇ loss_b)`` into ``p.grad``; return per-user norms (B,) before clipping.

        ``per_user_loss`` is the (B,) vector of the forward pass just run through the model.
        """
        assert per_user_loss.dim() == 1, f"per_user_loss must be (B,), got {tuple(per_user_loss.shape)}"
        records = list(self._records.values())
        self._records.clear()
        if not records:
            raise ValueError("no forward pass with gradients was recorded before clipped_backward")
        b = per_user_loss.shape[0]
        outputs = [r.output for r in records]
        grads = torch.autograd.grad(per_user_loss.sum(), outputs, allow_unused=True)
        sq = torch.zeros(b, dtype=per_user_loss.dtype, device=per_user_loss.device)
        finishers: list[Callable[[torch.Tensor], None]] = []
        for rec, g in zip(records, grads, strict=True):
            if g is None:
                continue  # layer did not influence the loss: zero gradient, nothing to add
            assert g.shape[0] == b, f"layer output must be (B, ...) with B={b}, got {tuple(g.shape)}"
            if isinstance(rec.module, nn.Linear):
                finishers.append(self._linear(rec.module, rec.inputs, g, sq))
            else:
                assert isinstance(rec.module, nn.Embedding)
                finishers.append(_embedding(rec.module, rec.inputs, g, sq))
        norms = sq.sqrt()
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # (B,) Opacus' formula
        for finish in finishers:
            finish(factor)
        return norms

    def _linear(
        self, layer: nn.Linear, x: torch.Tensor, g: torch.Tensor, sq: torch.Tensor
    ) -> Callable[[torch.Tensor], None]:
        b = g.shape[0]
        x = x.reshape(b, -1, x.shape[-1])  # (B, T, in)
        g = g.reshape(b, -1, g.shape[-1])  # (B, T, out)
        t, n_in, n_out = x.shape[1], x.shape[2], g.shape[2]
        gb: torch.Tensor | None = None
        if layer.bias is not None and layer.bias.requires_grad:
            gb = g.sum(1)  # (B, out) per-user bias gradients
            sq += gb.pow(2).sum(1)
        per_user: torch.Tensor | None = None
        if layer.weight.requires_grad:
            # Materialising costs B·out·in beyond the ordinary matmul, the ghost norm B·T²·(in+out):
            # materialise unless T = 1 (then the ghost norm is just ‖x_b‖²·‖g_b‖²) or memory forbids.
            if t > 1 and b * n_in * n_out <= self.materialize_limit:
                per_user = torch.bmm(g.transpose(1, 2), x)  # (B, out, in)
                sq += per_user.pow(2).sum((1, 2))
            else:
                gram_x = torch.bmm(x, x.transpose(1, 2))  # (B, T, T)
                gram_g = torch.bmm(g, g.transpose(1, 2))  # (B, T, T)
                sq += (gram_x * gram_g).sum((1, 2))

        def finish(factor: torch.Tensor) -> None:
            if gb is not None:
                _accumulate(layer.bias, factor @ gb)
            if per_user is not None:
                _accumulate(layer.weight, torch.einsum("b,boi->oi", factor, per_user))
            elif layer.weight.requires_grad:
                gs = (g * factor[:, None, None]).reshape(-1, n_out)  # (B·T, out)
                _accumulate(layer.weight, gs.T @ x.reshape(-1, n_in))

        return finish


def _embedding(
    layer: nn.Embedding, ids: torch.Tensor, g: torch.Tensor, sq: torch.Tensor
) -> Callable[[torch.Tensor], None]:
    """Per-user norms of an embedding gradient from (user, id) collisions; rows are never materialised."""
    b, d = g.shape[0], g.shape[-1]
    ids = ids.reshape(b, -1)  # (B, T)
    g = g.reshape(b, -1, d)  # (B, T, d)
    if layer.padding_idx is not None:  # F.embedding sends no gradient to the padding row
        g = g.masked_fill((ids == layer.padding_idx).unsqueeze(-1), 0.0)
    if ids.shape[1] == 1:  # one id per user: the user's gradient is that one row
        rows, row_ids, owner = g[:, 0], ids[:, 0], torch.arange(b, device=ids.device)
    else:
        n_rows = layer.num_embeddings
        keys = (torch.arange(b, device=ids.device).unsqueeze(1) * n_rows + ids).reshape(-1)  # (B·T,)
        uniq, inverse = torch.unique(keys, return_inverse=True)  # distinct (user, id) pairs
        rows = torch.zeros(len(uniq), d, dtype=g.dtype, device=g.device)
        rows.index_add_(0, inverse, g.reshape(-1, d))  # (U, d): user b's gradient row for id i
        owner, row_ids = uniq // n_rows, uniq % n_rows
    sq.index_add_(0, owner, rows.pow(2).sum(1))

    def finish(factor: torch.Tensor) -> None:
        if not layer.weight.requires_grad:
            return
        grad = torch.zeros_like(layer.weight)
        grad.index_add_(0, row_ids, rows * factor[owner].unsqueeze(1))
        _accumulate(layer.weight, grad)

    return finish


def _accumulate(p: torch.Tensor | None, grad: torch.Tensor) -> None:
    assert p is not None
    if p.grad is None:
        p.grad = grad.to(p.dtype)
    else:
        p.grad.add_(grad)


def _check_supported(model: nn.Module) -> list[nn.Module]:
    """The Linear/Embedding layers holding trainable parameters; refuse anything else."""
    layers: list[nn.Module] = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if isinstance(module, nn.Embedding):
            if module.sparse or module.max_norm is not None or module.scale_grad_by_freq:
                raise ValueError(
                    f"embedding {name!r}: sparse, max_norm and scale_grad_by_freq are not supported "
                    "by per-user clipping"
                )
        elif not isinstance(module, nn.Linear):
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) has trainable parameters; fast per-user "
                "clipping supports nn.Linear and nn.Embedding only (use clipping='ghost')"
            )
        layers.append(module)
    if not layers:
        raise ValueError("the model has no trainable parameters to clip")
    return layers


@contextmanager
def fast_clipping(model: nn.Module, *, max_grad_norm: float) -> Iterator[FastClipper]:
    """``with fast_clipping(model, max_grad_norm=C) as clipper: ...`` — hooks removed on exit."""
    clipper = FastClipper(model, max_grad_norm=max_grad_norm)
    try:
        yield clipper
    finally:
        clipper.remove()
