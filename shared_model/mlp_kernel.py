"""The MLP's serving arithmetic on plain arrays: :class:`HistoryMLP` scores without ``nn.Module`` calls.

A served request is small (one history, ≤ 1 682 items at ml-100k), so the ~30 ``nn.Module`` calls,
tensor allocations and shape checks of ``HistoryMLP.user_parts`` + ``score_items`` cost more than the
arithmetic itself (0.65 of the 0.8 ms a request took in-process). :class:`MLPKernel` does the same
operations in the same order on arrays prepared once at load:

* the item side (item vectors v_i, the item half of the first layer W_v·v_i, the bias b_i) as the
  model's ``item_side()`` gives it;
* the user-feature part of the user vector (a served request has no demographics: every feature is
  "unknown", row 0 of each table), and the hour/weekday tables;
* every later layer as a transposed weight ready for one matrix product.

A request then computes only its user part (mean of its history's embeddings, W_u·u + W_v·c + b) and
the layers after the first, on buffers reused between calls (per thread). The large products run in
torch (one thread, the fastest BLAS here), the gathers and elementwise steps in numpy. Scores equal
``HistoryMLP.score_all`` / ``score_items`` up to float32 rounding (tests/test_mlp_kernel.py); the
kernel applies to the fp32 model with plain Linear/ReLU layers, and :meth:`MLPKernel.build` returns
None elsewhere (int8 layers, another device or dtype), where the torch path stays.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedrec.shared_model.model import HistoryMLP

ItemSide = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class MLPKernel:
    """:class:`HistoryMLP` scoring for served requests (unknown demographics), see the module docstring."""

    @classmethod
    def build(cls, model: HistoryMLP, item_side: ItemSide, cap: int) -> MLPKernel | None:
        """The kernel of ``model`` (history capped at its latest ``cap`` items), or None if it does not apply."""
        layers = list(model.mlp)
        if len(layers) < 2 or not isinstance(layers[0], nn.Linear) or not isinstance(layers[-1], nn.Linear):
            return None
        if not all(type(m) in (nn.Linear, nn.ReLU) for m in layers):
            return None  # e.g. int8 layers (fedrec.shared_model.quantize): the torch path
        if not isinstance(layers[1], nn.ReLU) or layers[-1].out_features != 1:
            return None
        tensors = [p for p in model.parameters()] + [t for t in item_side]
        if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
            return None
        return cls(model, item_side, cap)

    def __init__(self, model: HistoryMLP, item_side: ItemSide, cap: int) -> None:
        cfg = model.cfg
        d = cfg.dim
        self.cap, self.n_items, self.dim = cap, cfg.n_items, d
        with torch.no_grad():
            self.emb = model.item_emb.weight.detach().numpy()  # (N+1, d) shares the model's memory
            user0 = torch.zeros(d)
            for table in model.user_feats:
                assert isinstance(table, nn.Embedding)
                user0 = user0 + table.weight[0]  # an unknown feature is code 0
            self.user0 = user0.numpy().astype(np.float32)  # (d,)
            self.has_user_feats = len(model.user_feats) > 0
            first = model.mlp[0]
            assert isinstance(first, nn.Linear)
            self.w_u_t = first.weight[:, :d].T.contiguous()  # (d, h1)
            w_v_t = first.weight[:, d:].T  # (d, h1)
            b1 = first.bias if first.bias is not None else torch.zeros(first.out_features)
            # Every (hour, weekday) context once: its vector c (25, 8, d) and W_v·c + b (25, 8, h1).
            self.ctx_vec: np.ndarray | None = None
            if model.hour_emb is not None and model.weekday_emb is not None:
                c = model.hour_emb.weight[:, None] + model.weekday_emb.weight[None]  # (25, 8, d)
                self.ctx_vec = c.numpy()
                self.ctx_h1 = (c @ w_v_t + b1).numpy()  # (25, 8, h1)
            else:
                self.ctx_h1 = b1.reshape(1, 1, -1).numpy().copy()  # (1, 1, h1): no context
            # Layers after the first ReLU: (W^T (in, out), bias (out,) or None, ReLU after it).
            self.layers: list[tuple[torch.Tensor, torch.Tensor | None, bool]] = []
            rest = list(model.mlp)[2:]
            for j, m in enumerate(rest):
                if isinstance(m, nn.Linear):
                    relu = j + 1 < len(rest) and isinstance(rest[j + 1], nn.ReLU)
                    b = m.bias.detach().clone() if m.bias is not None else None
                    self.layers.append((m.weight.detach().T.contiguous(), b, relu))
            item_vec, item_h1, item_b = (t.detach() for t in item_side)
            self.item_vec_t = item_vec.T.contiguous()  # (d, N) for the dot term's (B, d) × (d, N)
            self.item_vec_tt = item_vec.contiguous()  # (N, d)
            self.item_vec = self.item_vec_tt.numpy()
            self.item_h1_t = item_h1.contiguous()  # (N, h1)
            self.item_h1 = self.item_h1_t.numpy()
            self.item_b_t = item_b.contiguous()  # (N,)
            self.item_b = self.item_b_t.numpy()
        self.dot_term = cfg.dot_term
        self.mix = None if model.mix is None else float(model.mix.weight.detach()[0, 0])
        self.h1 = self.item_h1.shape[1]
        self._local = threading.local()  # per-thread scratch buffers

    # ------------------------------------------------------------------ user side
    def user_parts(
        self, histories: Sequence[np.ndarray], context: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """User vectors u (B, d), first-layer user parts W_u·u + W_v·c + b (B, h1), context vectors (B, d)."""
        n, d, cap = len(histories), self.dim, self.cap
        u = np.empty((n, d), dtype=np.float32)  # (B, d)
        for r, h in enumerate(histories):
            h = h[-cap:]
            if len(h):
                np.divide(self.emb[h].sum(0), np.float32(len(h)), out=u[r])
            else:
                u[r] = 0.0
        if self.has_user_feats:
            u += self.user0
        ctx = np.asarray(context, dtype=np.int64)
        if self.ctx_vec is None:
            hour = wday = np.zeros(n, dtype=np.int64)
            c = None
        else:  # -1 (unknown) → row 0
            hour, wday = np.maximum(ctx[:, 0] + 1, 0), np.maximum(ctx[:, 1] + 1, 0)
            c = self.ctx_vec[hour, wday]  # (B, d)
        uh1 = torch.addmm(
            torch.from_numpy(self.ctx_h1[hour, wday]), torch.from_numpy(u), self.w_u_t
        )  # (B, h1)
        return u, uh1.numpy(), c

    # ------------------------------------------------------------------ item side
    def _buffers(self, rows: int) -> list[torch.Tensor]:
        """Scratch activations for ``rows`` (user, item) pairs: one per hidden layer, reused per thread."""
        cache: dict[int, list[torch.Tensor]] | None = getattr(self._local, "bufs", None)
        if cache is None:
            cache = self._local.bufs = {}
        bufs = cache.get(rows)
        if bufs is None:
            if len(cache) > 8:
                cache.clear()
            widths = [self.h1] + [w.shape[1] for w, _, _ in self.layers[:-1]]
            bufs = cache[rows] = [torch.empty((rows, w), dtype=torch.float32) for w in widths]
        return bufs

    def _mlp_rest(self, bufs: list[torch.Tensor]) -> torch.Tensor:
        """The layers after the first ReLU on the activations in ``bufs[0]`` (R, h1) → the MLP output (R,)."""
        x = bufs[0]
        for (w_t, b, relu), out in zip(self.layers[:-1], bufs[1:], strict=True):
            if b is not None:
                torch.addmm(b, x, w_t, out=out)
            else:
                torch.mm(x, w_t, out=out)
            if relu:
                out.relu_()
            x = out
        w_t, b, _ = self.layers[-1]  # (h_last, 1) → 1
        y = torch.mv(x, w_t[:, 0])  # (R,)
        if b is not None:
            y += b[0]
        return y

    def score_all(self, histories: Sequence[np.ndarray], context: np.ndarray) -> np.ndarray:
        """Logits (B, N) over the whole catalogue: ``HistoryMLP.score_all`` with unknown demographics."""
        u, uh1, c = self.user_parts(histories, context)
        n, m = u.shape[0], self.n_items
        bufs = self._buffers(n * m)
        torch.add(self.item_h1_t.unsqueeze(0), torch.from_numpy(uh1).unsqueeze(1), out=bufs[0].view(n, m, -1))
        bufs[0].relu_()  # (B·N, h1)
        logit = self._mlp_rest(bufs).view(n, m).numpy()  # (B, N)
        logit += self.item_b
        if self.dot_term:
            dot = (torch.from_numpy(u) @ self.item_vec_t).numpy()  # (B, N)
            if c is not None:
                dot += np.einsum("bd,bd->b", u, c)[:, None]
            if self.mix is not None:
                dot *= np.float32(self.mix)
            logit += dot
        return logit

    def score_items(
        self, u: np.ndarray, uh1: np.ndarray, c: np.ndarray | None, items: np.ndarray
    ) -> np.ndarray:
        """Logits (B, C) of each row's own ``items`` (B, C): ``HistoryMLP.score_items`` with ``items``."""
        n, k = items.shape
        bufs = self._buffers(n * k)
        if n == 1:  # one request: numpy's gathers and broadcasts cost less call overhead than torch's
            return self._score_items_one(u, uh1, c, items, bufs)
        flat = torch.from_numpy(items.reshape(-1))  # (B·C,)
        torch.index_select(self.item_h1_t, 0, flat, out=bufs[0])  # (B·C, h1) gathers: torch, not numpy
        bufs[0].view(n, k, -1).add_(torch.from_numpy(uh1).unsqueeze(1))
        bufs[0].relu_()
        logit = self._mlp_rest(bufs).view(n, k)  # (B, C)
        logit += self.item_b_t[flat].view(n, k)
        if self.dot_term:
            tu = torch.from_numpy(u)
            dot = torch.bmm(self.item_vec_tt[flat].view(n, k, -1), tu.unsqueeze(2)).squeeze(2)  # (B, C)
            if c is not None:
                dot += torch.from_numpy(np.einsum("bd,bd->b", u, c)).unsqueeze(1)
            if self.mix is not None:
                dot *= self.mix
            logit += dot
        return logit.numpy()

    def _score_items_one(
        self,
        u: np.ndarray,
        uh1: np.ndarray,
        c: np.ndarray | None,
        items: np.ndarray,
        bufs: list[torch.Tensor],
    ) -> np.ndarray:
        """:meth:`score_items` for one row (B = 1), the same operations on numpy views."""
        k = items.shape[1]
        h = bufs[0].numpy()  # (C, h1)
        np.take(self.item_h1, items[0], axis=0, out=h)
        h += uh1[0]
        np.maximum(h, 0.0, out=h)
        logit = self._mlp_rest(bufs).numpy().reshape(1, k)  # (1, C)
        logit += self.item_b[items]
        if self.dot_term:
            dot = (self.item_vec[items[0]] @ u[0]).reshape(1, k)  # (1, C)
            if c is not None:
                dot += np.float32(u[0] @ c[0])
            if self.mix is not None:
                dot *= np.float32(self.mix)
            logit += dot
        return logit
