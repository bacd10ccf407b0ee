"""The shared recommender: a history-based NCF-MLP with no per-user parameter.

user vector  u = mean of the item embeddings of the user's history (+ Σ generalized user-feature embeddings)
item vector  v = item embedding (+ genre projection) (+ context embedding: hour, weekday)
logit(u, v)  = MLP([u ; v]) + b_item + u·v       (the NeuMF idea: MLP + per-item bias + dot product)

History and candidates are looked up in ONE embedding call (Opacus ghost clipping rejects a table
used twice). Every size is configurable; the defaults are the seed's (MLP 64-32-1, ReLU, sigmoid on
the logit, BCE with sampled negatives). Since the model has no user table, the global model alone can
rank for any user given a history, a new user included.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

#: Hour and weekday embeddings: index 0 = unknown, else value + 1.
N_HOURS, N_WEEKDAYS = 24, 7
#: Module names ``ModelConfig.trainable`` may list.
TRAINABLE_MODULES = (
    "mix", "mlp", "genre_proj", "user_feats", "hour_emb", "weekday_emb", "bias", "item_emb", "item_rows",
)  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of :class:`HistoryMLP` (serialized into ``model.json``)."""

    n_items: int  # catalogue size; index n_items is padding
    n_genres: int = 0  # width of the item genre multi-hot (0 = no genre input)
    user_cardinalities: tuple[int, ...] = ()  # table sizes of generalized user features (incl. unknown)
    dim: int = 32  # embedding width d
    hidden: tuple[int, ...] = (64, 32)  # MLP hidden widths; the output layer (→ 1) is implicit
    use_context: bool = True  # hour/weekday embeddings on the candidate side
    item_bias: bool = True  # per-item bias on the logit
    dot_term: bool = True  # u·v added to the MLP logit
    # Options for DP stages (docs/PRIVACY_UTILITY.md); the defaults are the original model.
    fixed_prior: bool = False  # a fixed per-item log-prior buffer (set_prior) added to the logit
    freeze_item_emb: bool = False  # item embeddings not trained (a DP or public init via set_item_embeddings)
    zero_init_output: bool = False  # output layer at 0 (dot_term=False: the logit starts at the prior)
    # A learned scalar on the dot term (``mix``, a 1→1 Linear so per-user clipping covers it), started
    # at this value; None = the dot term's weight is fixed at 1 (the original model).
    dot_mix: float | None = None
    # Genre projection, user-feature and context embeddings start at 0 (the logit then starts at
    # prior + dot_mix · u·v over the frozen item table alone).
    zero_init_side: bool = False
    # Names of the modules DP-SGD trains (prefixes of parameter names: "mix", "mlp", "genre_proj",
    # "user_feats", "hour_emb", "weekday_emb", "bias", "item_emb"); () = every parameter not frozen.
    trainable: tuple[str, ...] = ()
    # Training negatives drawn from exp(prior) instead of uniformly (needs fixed_prior). The prior then
    # explains nothing in training, so while training the logit leaves it out and the rest learns the
    # log-odds of the user's items against prior-popular ones — the part ranking adds to the prior.
    prior_negatives: bool = False
    # A frozen candidate-side table (buffer ``cand_delta`` (N+1, d), set by set_candidate_delta) added to
    # each candidate's vector, not to the history's: the dot term becomes u·(v_j + c_j), an ASYMMETRIC
    # item–item model. The release-init EASE table needs it (EASE's B_ij = h_i·h_j·a_j: this table holds
    # (a_j − 1)·h_j; fedrec.server.release_init.ease_tables).
    cand_table: bool = False
    # DP-FEST-style sparse item rows: a trainable delta (``item_rows`` (M+1, d), started at 0) on the item
    # vectors of only M items picked by a DP selection (``set_row_selection``); every other item's delta is
    # held at 0, so DP-SGD trains, clips and noises M·d numbers instead of N·d. 0 = off. The server folds
    # the delta into ``item_emb`` after each round (``fold_item_rows``), so a saved model's rows are 0.
    item_rows: int = 0

    def __post_init__(self) -> None:
        if self.n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {self.n_items}")
        if self.dim < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(f"dim and hidden widths must be >= 1, got dim={self.dim} hidden={self.hidden}")
        unknown = set(self.trainable) - set(TRAINABLE_MODULES)
        if unknown:
            raise ValueError(
                f"trainable modules must be among {', '.join(TRAINABLE_MODULES)}, got {sorted(unknown)}"
            )
        if self.prior_negatives and not self.fixed_prior:
            raise ValueError("prior_negatives needs fixed_prior (negatives are drawn from the prior)")
        if not 0 <= self.item_rows <= self.n_items:
            raise ValueError(f"item_rows must be in [0, n_items={self.n_items}], got {self.item_rows}")
        if "mix" in self.trainable and self.dot_mix is None:
            raise ValueError("trainable 'mix' needs dot_mix (the learned weight of the dot term)")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["user_cardinalities"] = list(self.user_cardinalities)
        d["hidden"] = list(self.hidden)
        d["trainable"] = list(self.trainable)
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(obj) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        obj = dict(obj)
        obj["user_cardinalities"] = tuple(obj.get("user_cardinalities", ()))
        obj["hidden"] = tuple(obj.get("hidden", (64, 32)))
        obj["trainable"] = tuple(obj.get("trainable", ()))
        return cls(**obj)


@dataclass
class Batch:
    """One training/eval batch of users (tensors on the model's device)."""

    history: torch.Tensor  # (B, L) long, padded with n_items
    candidates: torch.Tensor  # (B, C) long, padded with n_items
    user_features: torch.Tensor  # (B, F) long codes, 0 = unknown
    context: torch.Tensor  # (B, 2) long: hour, weekday, -1 = unknown
    labels: torch.Tensor | None = None  # (B, C) float 1/0
    weights: torch.Tensor | None = None  # (B, C) float, 0 on padding
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Batch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            history=self.history.to(device),
            candidates=self.candidates.to(device),
            user_features=self.user_features.to(device),
            context=self.context.to(device),
            labels=mv(self.labels),
            weights=mv(self.weights),
            extra=self.extra,
        )


class HistoryMLP(nn.Module):
    """History-based NCF-MLP (see module docstring)."""

    def __init__(self, cfg: ModelConfig, genres: np.ndarray | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.pad = cfg.n_items
        self.genres: torch.Tensor  # (N+1, G) buffer, registered below
        self.item_emb = nn.Embedding(cfg.n_items + 1, d)  # row n_items = padding (masked out)
        nn.init.normal_(self.item_emb.weight, std=0.05)
        if cfg.n_genres:
            g = np.zeros((cfg.n_items + 1, cfg.n_genres), dtype=np.float32)
            if genres is not None:
                assert genres.shape == (cfg.n_items, cfg.n_genres), (
                    f"genres must be ({cfg.n_items}, {cfg.n_genres}), got {genres.shape}"
                )
                g[: cfg.n_items] = genres
            self.register_buffer("genres", torch.from_numpy(g))  # (N+1, G)
            self.genre_proj: nn.Linear | None = nn.Linear(cfg.n_genres, d, bias=False)
        else:
            self.register_buffer("genres", torch.zeros(cfg.n_items + 1, 0))
            self.genre_proj = None
        self.user_feats = nn.ModuleList(nn.Embedding(c, d) for c in cfg.user_cardinalities)
        for emb in self.user_feats:
            assert isinstance(emb, nn.Embedding)
            nn.init.normal_(emb.weight, std=0.05)
        if cfg.use_context:
            self.hour_emb: nn.Embedding | None = nn.Embedding(N_HOURS + 1, d)
            self.weekday_emb: nn.Embedding | None = nn.Embedding(N_WEEKDAYS + 1, d)
            nn.init.normal_(self.hour_emb.weight, std=0.05)
            nn.init.normal_(self.weekday_emb.weight, std=0.05)
        else:
            self.hour_emb = self.weekday_emb = None
        widths = [2 * d, *cfg.hidden]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], 1))
        self.mlp = nn.Sequential(*layers)
        self.bias = nn.Embedding(cfg.n_items + 1, 1) if cfg.item_bias else None
        if self.bias is not None:
            nn.init.zeros_(self.bias.weight)
        if cfg.zero_init_output:
            out_layer = self.mlp[-1]
            assert isinstance(out_layer, nn.Linear)
            nn.init.zeros_(out_layer.weight)
            nn.init.zeros_(out_layer.bias)
        self.mix: nn.Linear | None = None
        if cfg.dot_mix is not None:
            self.mix = nn.Linear(1, 1, bias=False)
            nn.init.constant_(self.mix.weight, cfg.dot_mix)
        if cfg.zero_init_side:
            for m in (self.genre_proj, self.hour_emb, self.weekday_emb, *self.user_feats):
                if m is not None:
                    nn.init.zeros_(m.weight)
        self.row_of: torch.Tensor | None  # (N+1,) long: item → its row of item_rows (M = not selected)
        self.item_rows: nn.Embedding | None = None
        if cfg.item_rows:
            self.item_rows = nn.Embedding(cfg.item_rows + 1, d)  # row M: the items not selected (held at 0)
            nn.init.zeros_(self.item_rows.weight)
            self.register_buffer("row_of", torch.full((cfg.n_items + 1,), cfg.item_rows, dtype=torch.long))
        else:
            self.row_of = None
        if cfg.freeze_item_emb:
            self.item_emb.weight.requires_grad_(False)
        if cfg.trainable:
            for name, p in self.named_parameters():
                if name.split(".")[0] not in cfg.trainable:
                    p.requires_grad_(False)
        self.prior: torch.Tensor | None
        if cfg.fixed_prior:
            self.register_buffer("prior", torch.zeros(cfg.n_items + 1))  # (N+1,) row n_items = padding
        else:
            self.prior = None
        self.cand_delta: torch.Tensor | None
        if cfg.cand_table:
            self.register_buffer("cand_delta", torch.zeros(cfg.n_items + 1, d))  # row n_items = padding
        else:
            self.cand_delta = None

    # ------------------------------------------------------------------ DP-stage inputs
    def set_prior(self, prior: np.ndarray) -> None:
        """Fill the fixed log-prior buffer (needs ``fixed_prior``), (n_items,)."""
        assert self.prior is not None, "set_prior needs ModelConfig(fixed_prior=True)"
        assert prior.shape == (self.cfg.n_items,), f"prior must be ({self.cfg.n_items},), got {prior.shape}"
        with torch.no_grad():
            self.prior[: self.cfg.n_items] = torch.as_tensor(prior, dtype=self.prior.dtype)

    def set_item_embeddings(self, emb: np.ndarray) -> None:
        """Initialise the item table (n_items, dim) from a DP or public representation."""
        n, d = self.cfg.n_items, self.cfg.dim
        assert emb.shape == (n, d), f"item embeddings must be ({n}, {d}), got {emb.shape}"
        with torch.no_grad():
            self.item_emb.weight[:n] = torch.as_tensor(emb, dtype=self.item_emb.weight.dtype)

    def set_candidate_delta(self, delta: np.ndarray) -> None:
        """Fill the frozen candidate-side table (needs ``cand_table``), (n_items, dim)."""
        assert self.cand_delta is not None, "set_candidate_delta needs ModelConfig(cand_table=True)"
        n, d = self.cfg.n_items, self.cfg.dim
        assert delta.shape == (n, d), f"candidate table must be ({n}, {d}), got {delta.shape}"
        with torch.no_grad():
            self.cand_delta[:n] = torch.as_tensor(delta, dtype=self.cand_delta.dtype)

    def set_row_selection(self, items: np.ndarray) -> None:
        """The M items whose rows DP-SGD trains (needs ``item_rows`` = M): item ``items[r]`` → row r."""
        assert self.row_of is not None, "set_row_selection needs ModelConfig(item_rows=M)"
        m = self.cfg.item_rows
        items = np.asarray(items, dtype=np.int64)
        assert items.shape == (m,) and len(np.unique(items)) == m, f"need {m} distinct items"
        assert items.min() >= 0 and items.max() < self.cfg.n_items, "items must be catalogue indices"
        with torch.no_grad():
            self.row_of.fill_(m)
            self.row_of[torch.from_numpy(items)] = torch.arange(m)

    def _item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Item vectors (…, d) of ``ids``: the item table plus the trained row of each selected item."""
        emb = self.item_emb(ids)
        if self.item_rows is not None and self.row_of is not None:
            rows = self.row_of[ids]
            emb = emb + self.item_rows(rows) * (rows < self.cfg.item_rows).unsqueeze(-1).to(emb.dtype)
        return emb

    # ------------------------------------------------------------------ pieces
    def _user_vector(
        self, hist_emb: torch.Tensor, history: torch.Tensor, user_features: torch.Tensor
    ) -> torch.Tensor:
        """Masked mean of history embeddings + user-feature embeddings → (B, d)."""
        mask = (history != self.pad).unsqueeze(-1).to(hist_emb.dtype)  # (B, L, 1)
        u = (hist_emb * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, d)
        for j, emb in enumerate(self.user_feats):
            u = u + emb(user_features[:, j])
        return u

    def _context_vector(self, context: torch.Tensor) -> torch.Tensor | None:
        """(B, d) context embedding, or None when context is off."""
        if self.hour_emb is None or self.weekday_emb is None:
            return None
        hour = (context[:, 0] + 1).clamp(min=0)  # -1 (unknown) → 0
        wd = (context[:, 1] + 1).clamp(min=0)
        return self.hour_emb(hour) + self.weekday_emb(wd)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        history: torch.Tensor,
        candidates: torch.Tensor,
        user_features: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B, C) of P(interaction) for each user's candidates."""
        assert history.dim() == 2 and candidates.dim() == 2, "history (B, L) and candidates (B, C)"
        b, length = history.shape
        assert candidates.shape[0] == b, "one candidate row per user"
        emb = self._item_vectors(torch.cat([history, candidates], dim=1))  # (B, L+C, d) — one lookup
        u = self._user_vector(emb[:, :length], history, user_features)  # (B, d)
        v = emb[:, length:]  # (B, C, d)
        if self.cand_delta is not None:
            v = v + self.cand_delta[candidates]  # the candidate side only (cand_table)
        if self.genre_proj is not None:
            v = v + self.genre_proj(self.genres[candidates])  # (B, C, d)
        c = self._context_vector(context)
        if c is not None:
            v = v + c.unsqueeze(1)
        uu = u.unsqueeze(1).expand(-1, v.shape[1], -1)  # (B, C, d)
        logit = self.mlp(torch.cat([uu, v], dim=-1)).squeeze(-1)  # (B, C)
        if self.bias is not None:
            logit = logit + self.bias(candidates).squeeze(-1)
        if self.cfg.dot_term:
            dot = (uu * v).sum(-1)  # (B, C)
            logit = logit + (dot if self.mix is None else self.mix(dot.unsqueeze(-1)).squeeze(-1))
        if self.prior is not None:
            if self.training and self.cfg.prior_negatives:
                # Bayes logit of "a user's item vs an exp(prior)-drawn negative" is log-affinity plus
                # log(positives/negatives); the prior holds log p + log(N/negatives), so that constant
                # is logsumexp(prior) − log N. The per-item prior itself cancels.
                n = self.cfg.n_items
                logit = logit + (torch.logsumexp(self.prior[:n], 0) - math.log(n))
            else:
                logit = logit + self.prior[candidates]
        return logit

    def negative_probs(self) -> np.ndarray | None:
        """(n_items,) sampling distribution of training negatives: exp(prior) normalised, or None (uniform)."""
        if not self.cfg.prior_negatives or self.prior is None:
            return None
        p = torch.softmax(self.prior[: self.cfg.n_items].double(), 0).cpu().numpy()
        out: np.ndarray = p / p.sum()
        return out

    @torch.no_grad()
    def score_all(
        self,
        history: torch.Tensor,
        user_features: torch.Tensor,
        context: torch.Tensor,
        item_side: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits (B, n_items) over the whole catalogue in one batched pass.

        The first MLP layer is linear in [u ; v], so its item half W_v·(e_i + g_i) is computed once for
        all items (``item_side()``, cacheable per model) and each user adds only W_u·u + W_v·c.
        """
        if item_side is None:
            item_side = self.item_side()
        u, c = self.user_parts(history, user_features, context)
        logit = self.score_items(u, c, item_side)
        assert logit.shape == (history.shape[0], self.cfg.n_items), "scores must be (B, n_items)"
        return logit

    @torch.no_grad()
    def user_parts(
        self, history: torch.Tensor, user_features: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The user side of a score: user vector u (B, d) and context vector c (B, d) or None."""
        u = self._user_vector(self._item_vectors(history), history, user_features)  # (B, d)
        return u, self._context_vector(context)

    def score_items(
        self,
        u: torch.Tensor,
        c: torch.Tensor | None,
        item_side: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        items: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of users (u, c from :meth:`user_parts`) for the whole catalogue (``items`` None):
        (B, N); or for each row's own items (``items`` (B, C) dense indices): (B, C), the same numbers
        as the catalogue pass gives those items (the MLP re-rank of a candidate set). Differentiable:
        callers that do not train wrap it in ``torch.no_grad()`` / ``inference_mode()``.
        """
        item_vec, item_h1, item_b = item_side  # (N, d), (N, h1), (N,)
        if items is None:
            vec, h1, bias = item_vec.unsqueeze(0), item_h1.unsqueeze(0), item_b.unsqueeze(0)  # (1, N, ·)
        else:
            vec, h1, bias = item_vec[items], item_h1[items], item_b[items]  # (B, C, d), (B, C, h1), (B, C)
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        d = self.cfg.dim
        w_u, w_v = first.weight[:, :d], first.weight[:, d:]  # (h1, d) each
        user_h1 = u @ w_u.T + first.bias  # (B, h1)
        if c is not None:
            user_h1 = user_h1 + c @ w_v.T
        b, m = user_h1.shape[0], h1.shape[1]
        # 2-D ops on fresh tensors, ReLU in place: 3-D nn.Linear and out-of-place ReLU cost ~5× more here.
        h = (user_h1.unsqueeze(1) + h1).relu_().reshape(b * m, -1)  # (B·M, h1)
        for layer in list(self.mlp)[2:]:
            if isinstance(layer, nn.Linear):
                h = (
                    torch.addmm(layer.bias, h, layer.weight.T)
                    if layer.bias is not None
                    else h @ layer.weight.T
                )
            elif isinstance(layer, nn.ReLU):
                h = h.relu_()
            else:  # e.g. the int8 layers of fedrec.shared_model.quantize
                h = layer(h)
        logit = h.reshape(b, m) + bias  # (B, M)
        if self.cfg.dot_term:
            dot = u @ item_vec.T if items is None else torch.bmm(vec, u.unsqueeze(2)).squeeze(2)  # (B, M)
            if c is not None:
                dot = dot + (u * c).sum(-1, keepdim=True)
            logit = logit + (dot if self.mix is None else dot * self.mix.weight[0, 0])
        return logit

    def retrieval_side(
        self, item_side: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Item vectors as columns r (d, N) and offsets a (N,) of a cheap retrieval score u·r_i + a_i.

        The whole logit of item i as a function of the user vector, f_i(u) = MLP([u; v_i + c]) + b_i +
        u·(v_i + c), linearized around ū, the catalogue's mean item vector (c: the mean hour and
        weekday): f_i(u) ≈ f_i(ū) + g_i·(u − ū), g_i = ∂f_i/∂u at ū (one batched backward pass at
        load). The dot-product term and the bias are kept exactly; the MLP enters by its value and
        slope at ū. Ranking the catalogue by it costs one (B, d) × (d, N) product per request
        (r is returned transposed and contiguous, the layout that product reads fastest).
        """
        item_vec = item_side[0]
        n, d = item_vec.shape
        u0 = item_vec.mean(0)  # (d,) the expansion point
        c0 = None
        if self.hour_emb is not None and self.weekday_emb is not None:
            c0 = (self.hour_emb.weight[1:].mean(0) + self.weekday_emb.weight[1:].mean(0)).detach()
        with torch.enable_grad():
            u = u0.detach().expand(n, d).clone().requires_grad_(True)  # (N, d) one row per item
            c = None if c0 is None else c0.expand(n, d)
            own = torch.arange(n, device=item_vec.device).unsqueeze(1)  # (N, 1): row i scores item i
            f = self.score_items(u, c, item_side, own).squeeze(1)  # (N,)
            (g,) = torch.autograd.grad(f.sum(), u)  # (N, d)
        return g.detach().T.contiguous(), (f - g @ u0).detach()

    @staticmethod
    def retrieval_scores(u: torch.Tensor, retrieval_side: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """u·r_i + a_i (B, N) for users ``u`` (B, d): see :meth:`retrieval_side`."""
        cols, offset = retrieval_side  # (d, N), (N,)
        return torch.addmm(offset.unsqueeze(0), u, cols)  # (B, N)

    @torch.no_grad()
    def item_side(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-item precomputation for :meth:`score_all`: (v (N,d), W_v·v (N,h1), bias (N,))."""
        n = self.cfg.n_items
        v = self._item_vectors(torch.arange(n, device=self.item_emb.weight.device))  # (N, d)
        if self.cand_delta is not None:
            v = v + self.cand_delta[:n]
        if self.genre_proj is not None:
            v = v + self.genre_proj(self.genres[:n])
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        h1 = v @ first.weight[:, self.cfg.dim :].T  # (N, h1)
        b = self.bias.weight[:n, 0] if self.bias is not None else torch.zeros(n, device=v.device)
        if self.prior is not None:
            b = b + self.prior[:n]
        return v, h1, b


def fold_item_rows(weights: dict[str, np.ndarray]) -> None:
    """Move the trained rows of ``item_rows`` into ``item_emb`` and zero them, in place on a model's
    weights: the same model (each selected item's vector is table + row either way), with every reader
    of ``item_emb`` (serving kernel, explanations) exact. A no-op for models without item rows."""
    if "item_rows.weight" not in weights:
        return
    rows, row_of, emb = weights["item_rows.weight"], weights["row_of"], weights["item_emb.weight"]
    m = rows.shape[0] - 1
    picked = np.flatnonzero(row_of < m)  # (M,) the selected items
    emb[picked] = (emb[picked] + rows[row_of[picked]]).astype(emb.dtype)
    rows[:] = 0.0


def shared_keys(model: nn.Module) -> list[str]:
    """Names of the parameters shared with the server (all of them: the model has no per-user part)."""
    return [k for k, _ in model.named_parameters()]
