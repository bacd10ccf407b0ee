"""The configuration of a federated run, parsed once from Flower's ``context.run_config``.

Defaults live in ``[tool.flwr.app.config]`` of pyproject.toml (kebab-case, scalars only); this
dataclass mirrors them with a comment on each and rejects unknown keys, so a typo is an error rather
than a silent default. Node facts (tenant folder, key file, state dir) never come from here: they
come from ``node_config`` (deployment) or ``partition-id`` + ``fed-dir`` (simulation).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedrec.shared_model.errors import FedrecError

#: Server optimizers applied to the aggregated delta (``fedrec.server.aggregation.ServerOptimizer``).
SERVER_OPTS: tuple[str, ...] = ("fedavg", "fedavgm", "fedadam")
#: Which round's model a run keeps: the best on federated validation, or the last one.
FINAL_MODELS: tuple[str, ...] = ("best-val", "last")

#: What the ``auto`` (0 / "auto") settings resolve to, with and without DP. The no-DP recipe was chosen
#: on federated VALIDATION NDCG@10 (ml-100k, 5 tenants, dirichlet:0.5; docs/FEDERATION.md): the
#: federated MLP needs about as many local epochs in total as the centralized one (~100), a larger
#: local step, and server momentum to carry the drift between non-IID tenants. The DP recipe is the
#: one the DP-SGD accounting was tuned with (one local epoch per round, plain FedAvg); under DP the
#: final model is the last round's, since picking a round on the tenants' (un-noised) validation
#: figures would be a release the accountant does not cover.
AUTO_NO_DP: dict[str, Any] = {
    "num_server_rounds": 24,
    "local_epochs": 5.0,
    "lr": 0.01,
    "server_opt": "fedavgm",
    "max_update_norm": 50.0,
    "final_model": "best-val",
}
AUTO_DP: dict[str, Any] = {
    "num_server_rounds": 5,
    "local_epochs": 1.0,
    "lr": 3e-3,
    "server_opt": "fedavg",
    "max_update_norm": 20.0,
    "final_model": "last",
}

#: How DP-SGD trains the MLP (client/train.py). ``local-steps``: each round every tenant takes
#: ``local-epochs`` passes of Poisson-sampled DP-SGD steps with local Adam and sends its model.
#: ``cohort`` (DP-FedAvg-style, McMahan et al. 2018): each round every tenant Poisson-samples its users at
#: rate ``cohort-rate``, sends ONE noisy clipped gradient sum (as a step of size 1 over its expected
#: cohort), and the server applies its optimizer to the weighted mean — the noisy sum of all tenants
#: over the expected cohort size. Only this mode is linear in the noisy sums, so only it may split the
#: noise between tenants under SecAgg+ (docs/FEDERATION.md).
DP_MODES: tuple[str, ...] = ("local-steps", "cohort")
#: The auto recipe of dp-mode cohort: one large-batch step per round, FedAdam (auto server-lr 0.01) on the
#: noisy mean gradient, 15 rounds — the setting the ml-100k runs of docs/FEDERATION.md used. NOT tuned:
#: the whole MLP does not learn with it, and the release-init head did best with --server-lr 0.2–0.3.
AUTO_COHORT: dict[str, Any] = {
    "num_server_rounds": 15,
    "local_epochs": 1.0,  # unused by cohort mode (one step per round), kept valid
    "lr": 1.0,  # the tenant's step: exactly the noisy mean gradient (SGD, lr 1); the server scales it
    "server_opt": "fedadam",
    "max_update_norm": 20.0,
    "final_model": "last",
}
#: Poisson rate of a cohort round when cohort-rate is auto (0).
AUTO_COHORT_RATE = 0.5

#: ``release-init`` when not given: the DP head below under DP with approach mlp (dp-mode local-steps), off
#: (0) everywhere else. An explicit value always wins; 0 is off.
AUTO_RELEASE_INIT = -1.0
#: The DP-SGD head (docs/FEDERATION.md, "a DP-SGD head that beats DP popularity on validation"): what
#: approach mlp under DP (dp-mode local-steps) trains when release-init is not given. Round 1 spends 0.9 of
#: each tenant's ε on a DP popularity release (the model's fixed prior) with the public genre vectors as
#: the frozen item table; DP-SGD then trains only a learned weight on the dot term, with negatives drawn
#: from the prior, at lr 0.3 and clipping bound 0.05. Chosen on validation (ml-100k and synthetic); plain
#: DP-SGD of the whole MLP is at random level there. Each key applies only where it was not given.
AUTO_HEAD: dict[str, Any] = {
    "release_init": 0.9,
    "release_init_items": "genres",
    "release_init_pop": 1.0,
    "dot_mix": 0.0,
    "dp_train": "mix",
    "prior_negatives": True,
    "lr": 0.3,
    "max_grad_norm": 0.05,
}
#: The DP-SGD part on top of ``release-init-items ease`` (DP-EASE's item–item model of the release as
#: frozen tables): the dot term's weight starts at 300 (the EASE term then ranks, the prior breaks ties;
#: 0 leaves the prior alone ranking and DP-SGD cannot climb to 300), DP-SGD trains that weight and the MLP
#: on top (and, in cohort rounds, the rows of the most popular items), negatives from the prior,
#: clipping bound 0.05. Chosen on validation (synthetic 20 000 users,
#: ε 3, cohort rounds under SecAgg+; docs/FEDERATION.md "The EASE table"). Each key applies only where
#: it was not given.
AUTO_EASE: dict[str, Any] = {
    "dim": 256,  # the table keeps `dim` of DP-EASE's components: 32 of 604 lost 0.03 at 100k users, ε 8
    "dot_mix": 300.0,
    "dp_train": "mix,mlp",
    "prior_negatives": True,
    "max_grad_norm": 0.05,
    # cohort rounds only: DP-SGD also trains the rows of the 100 items the release's DP popularity ranks
    # highest (dp-rows; 100 beat 400 and 0 on validation, 1 000-item catalogues, docs/FEDERATION.md)
    "dp_rows": 100,
}
#: What the head's keys resolve to when the head does not apply (their meaning before the head existed).
AUTO_NO_HEAD: dict[str, Any] = {
    "release_init": 0.0,
    "release_init_items": "eigen",
    "release_init_pop": 0.5,
    "max_grad_norm": 1.0,
}

#: The MLP's embedding width when ``dim`` is auto (0) and the item table is not the EASE table.
AUTO_DIM = 32
#: The heads ``approach auto`` may resolve to besides approach mlp's own default ("": the DP head of
#: AUTO_HEAD): "ease" is the EASE-table head in cohort rounds (AUTO_EASE_HEAD).
HEADS: tuple[str, ...] = ("", "ease")
#: What ``approach auto`` trains where it picks the EASE-table head (``fedrec.server.release``): cohort
#: rounds (their noise split into shares under SecAgg+), round 1 spends 0.95 of ε on one release with 0.05 of
#: its μ² on popularity, DP-EASE's tables from it, then DP-SGD of AUTO_EASE's keys. The measured recipe
#: of docs/FEDERATION.md ("The EASE table"); each key applies only where it was left auto, except
#: dp-mode, which the head needs.
AUTO_EASE_HEAD: dict[str, Any] = {
    "dp_mode": "cohort",
    "release_init": 0.95,
    "release_init_items": "ease",
    "release_init_pop": 0.05,
    "cohort_rate": 0.2,
    "server_lr": 0.3,
    "num_server_rounds": 5,
}

#: What a run trains: DP-SGD rounds of the MLP, or one DP item release fitted by the server; ``auto``
#: lets the server pick from public facts (``fedrec.shared_model.choose``).
APPROACHES: tuple[str, ...] = ("mlp", "dp_ease", "dp_popularity", "dp_two_stage", "auto")
#: The approaches that are DP item releases (``fedrec.privacy.gram``) instead of training rounds:
#: one release, or two for ``dp_two_stage`` (a DP popularity release selects the items of a Gram release).
RELEASE_APPROACHES: tuple[str, ...] = ("dp_ease", "dp_popularity", "dp_two_stage")


@dataclass(frozen=True)
class RunConfig:
    num_server_rounds: int = 0  # federated rounds (0: auto, AUTO_DP / AUTO_NO_DP)
    fed_dir: str = ""  # simulation: folder written by `fedrec prepare` (tenant-<i>/, keys/, catalog.json)
    catalog: str = ""  # public catalogue JSON (default: <fed-dir>/catalog.json)
    run_dir: str = ""  # where the ServerApp writes RUN_DIR files (absolute path on the coordinator)
    run_name: str = "run"  # names the per-run state dir of each tenant (budget + ledger)
    num_tenants: int = 0  # tenants the server waits for (0: all of federation.json)
    min_tenants: int = 1  # fewest successful tenants for a round to count
    node_wait_timeout: float = 120.0  # seconds to wait for the SuperNodes to connect
    round_timeout: float = 1800.0  # seconds to wait for the replies of one round
    rejoin_wait: float = 0.0  # before each round, seconds to wait for a dropped tenant node to come back
    dp: bool = True  # user-level DP-SGD; false = same pipeline without clipping or noise
    epsilon: float = 8.0  # each tenant's user-level ε cap for the whole run
    delta: float = 1e-5  # δ; must be < 1/users of every tenant
    caps: str = ""  # per-tenant caps overriding epsilon, e.g. "tenant-0=3,tenant-2=1"
    accountant: str = "prv"  # prv | rdp (never gdp for the ledger)
    max_grad_norm: float = 0.0  # per-user clipping bound C (0: auto, 0.05 for the DP head, else 1.0)
    local_epochs: float = 0.0  # expected passes over a tenant's users per round (0: auto)
    batch_users: int = 64  # expected users per DP step (Poisson rate q = 1/ceil(n/batch))
    lr: float = 0.0  # local Adam learning rate (0: auto; 0.3 for the DP head)
    dim: int = 0  # embedding width (0: auto, 256 with release-init-items ease, else 32)
    hidden: str = "64,32"  # MLP hidden widths
    max_history: int = 50  # history items per training example
    targets: int = 20  # held-out positives per training example
    negatives: int = 4  # sampled negatives per positive
    eval_every: int = 1  # validation every N rounds (test always at the end)
    # dp: only the final test sums leave a tenant, Gaussian-noised and charged (docs/TRANSCRIPT.md);
    # exact: exact validation/test sums every round, NOT covered by ε (simulation research only)
    eval_privacy: str = "dp"
    seed: int = 0  # model init, sampling and noise seeds derive from this
    # mlp (DP-SGD rounds) | dp_ease | dp_popularity (one DP item release, docs/PRIVACY_UTILITY.md) | auto
    approach: str = "mlp"
    gram_limit: int = 4000  # most items one item–item Gram release covers (the O(M³) fit, M(M+1)/2 floats)
    select_share: float = (
        0.1  # dp_two_stage: share of the budget's μ² spent on the selecting popularity release
    )
    # dp_two_stage: how many items the Gram covers. c > 0: the M rule (server/release.py two_stage_size:
    # the items whose stage-1 noisy popularity is ≥ c × the Gram's noise edge per item, s₂·√M), capped
    # at gram-limit; 0: exactly min(gram-limit, catalogue) items (what an explicit --gram-limit asks for)
    select_rule: float = 1.0
    # dp_two_stage with the M rule: the Gram covers tier × M items; DP-EASE fits the top M (the M rule's
    # head, its own noise edge) and the rest are scored by a ridge regression on the head
    # (DPEASE.fit_gram_tiered). Capped at gram-limit. Post-processing: no ε of its own. 1 (the default):
    # no tier — 1.5 won on validation at 30k × 40k but lost on ml-100k (docs/PRIVACY_UTILITY.md).
    tier: float = 1.0
    # --- secure aggregation, validation, robust aggregation (server/secagg.py, server/aggregation.py)
    secagg: bool = False  # SecAgg+: the server only ever sees the masked sum of the tenants' deltas
    max_update_norm: float = 0.0  # L2 bound on one tenant's delta per round, SecAgg+'s ±range (0: auto)
    secagg_max_weight: float = 0.0  # largest tenant user count under SecAgg+ (0: from the manifests)
    aggregation: str = "fedavg"  # fedavg | median | trimmed:<fraction cut at each end, < 0.5>
    # --- server optimizer on the aggregated delta, and which round's model is kept
    server_opt: str = "auto"  # auto | fedavg | fedavgm (server momentum) | fedadam
    server_lr: float = 0.0  # server step size (0: 1.0 for fedavg/fedavgm, 0.01 for fedadam)
    server_momentum: float = 0.5  # FedAvgM momentum μ
    final_model: str = "auto"  # auto | best-val (best federated validation NDCG@10) | last
    # share s of each tenant's ε spent on one item release that initialises the MLP (round 1; the
    # DP-SGD rounds get the rest); 0 = off. Approach mlp only (fedrec.server.release_init).
    # -1 (AUTO_RELEASE_INIT, the default): the DP head (AUTO_HEAD) under DP with approach mlp and dp-mode
    # local-steps, else off
    release_init: float = AUTO_RELEASE_INIT
    # what the release-init model is built from (fedrec.server.release_init): the frozen item table
    # (eigen = the release's EigenGram vectors | genres = public genre vectors, no ε | genres+eigen |
    # text = public title embeddings of a bundled sentence model, no ε | genres+text), the
    # release's popularity share ρ (1: popularity only, all of it on the prior), a learned weight on the
    # dot term started at dot-mix (< 0: off, weight fixed at 1), and the modules DP-SGD trains
    # (comma list of mix, mlp, genre_proj, user_feats, hour_emb, weekday_emb; "" = all but the frozen table).
    # "auto"/0: the DP head's values (AUTO_HEAD) when release-init is auto and resolves to the head, else
    # eigen / 0.5. dot-mix, dp-train and prior-negatives left at their defaults (-1, "", false) take the
    # head's values (0, "mix", true) when the head applies; an explicit release-init keeps them as given.
    release_init_items: str = "auto"
    # public item titles for release-init-items text / genres+text: a CSV with an item (or movieId) and a
    # title column; "" = the catalogue's own titles (fedrec.shared_model.item_text)
    item_titles: str = ""
    release_init_pop: float = 0.0
    dot_mix: float = -1.0
    dp_train: str = ""
    # release-init: draw training negatives from the DP prior (exp(prior)) so DP-SGD learns what the user's
    # items have beyond popularity, the part that changes the ranking (fedrec.shared_model.model)
    prior_negatives: bool = False
    # release-init: DP-FEST-style sparse item rows. M > 0: DP-SGD also trains a delta on the embedding rows
    # of the M items the release's DP popularity ranks highest (and only those: M·dim numbers clipped and
    # noised, not catalogue·dim); 0 = off; -1 = auto: AUTO_EASE's with the EASE table in cohort rounds,
    # else off. The selection is post-processing of round 1's release.
    dp_rows: int = -1
    # local-steps: several local DP-SGD (Adam) steps per round | cohort: one noisy clipped gradient sum per
    # round at Poisson rate cohort-rate, server optimizer on the noisy mean (DP_MODES above)
    dp_mode: str = "local-steps"
    cohort_rate: float = 0.0  # dp-mode cohort: Poisson rate q of each round's cohort (0: auto, 0.5)
    resume: bool = False  # continue run-dir from its checkpoint (rounds after the last complete one)
    # --- simulated faults (acted on only by simulated nodes, i.e. with partition-id; client/faults.py)
    fault_dropout: float = 0.0  # probability that a tenant misses a round (drawn from seed/tenant/round)
    fault_crash: str = ""  # "tenant-1@3,…": that tenant's client process dies mid-round (after charging)
    fault_adversary: str = ""  # "tenant-0:nan|inf|scale=F|signflip|shape|dtype|keys|users=N,…"

    def __post_init__(self) -> None:
        # the settings as given, auto values included: what to_mapping() hands on, so that the server and
        # every tenant resolve the same auto settings the same way (also after auto picks an approach)
        object.__setattr__(self, "_given", {f.name: getattr(self, f.name) for f in fields(self)})
        if self.dp_mode not in DP_MODES:
            raise FedrecError(f"dp-mode must be one of {', '.join(DP_MODES)}, got {self.dp_mode!r}")
        if self.dp_mode == "cohort" and not self.dp:
            raise FedrecError(
                "dp-mode cohort is a DP-SGD mode (one noisy clipped sum per round): it needs DP"
            )
        if not (isinstance(self.cohort_rate, int | float) and 0 <= self.cohort_rate <= 1):
            raise FedrecError(f"cohort-rate must be in (0, 1] (0: auto), got {self.cohort_rate!r}")
        if self.cohort_rate > 0 and self.dp_mode != "cohort":
            raise FedrecError("cohort-rate is the Poisson rate of dp-mode cohort: it needs dp-mode cohort")
        self._resolve_auto()
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise FedrecError(f"dim must be an integer ≥ 1 (0: auto), got {self.dim!r}")
        if self.num_server_rounds < 1:
            raise FedrecError(f"num-server-rounds must be >= 1 (0: auto), got {self.num_server_rounds}")
        if not self.local_epochs > 0:
            raise FedrecError(f"local-epochs must be > 0 (0: auto), got {self.local_epochs}")
        if not self.lr > 0:
            raise FedrecError(f"lr must be > 0 (0: auto), got {self.lr}")
        if self.dp_mode == "cohort" and self.lr != 1.0:
            raise FedrecError(
                "lr is the local Adam step of dp-mode local-steps; a cohort round sends the noisy mean "
                f"gradient itself (step 1): set the step with server-lr instead (got lr {self.lr:g})"
            )
        if self.server_opt not in SERVER_OPTS:
            raise FedrecError(
                f"server-opt must be auto or one of {', '.join(SERVER_OPTS)}, got {self.server_opt!r}"
            )
        if not self.server_lr > 0:
            raise FedrecError(f"server-lr must be > 0 (0: auto), got {self.server_lr}")
        if not 0 <= self.server_momentum < 1:
            raise FedrecError(f"server-momentum must be in [0, 1), got {self.server_momentum}")
        if not 0 <= self.release_init < 1:
            raise FedrecError(
                f"release-init must be in [0, 1) (the release's share of ε), got {self.release_init}"
            )
        if self.release_init > 0 and self.approach != "mlp":
            raise FedrecError(
                f"release-init initialises the MLP: it needs approach mlp, got {self.approach!r}"
            )
        if self.release_init_items not in ("eigen", "genres", "genres+eigen", "text", "genres+text", "ease"):
            raise FedrecError(
                "release-init-items must be eigen, genres, genres+eigen, text, genres+text or ease, "
                f"got {self.release_init_items!r}"
            )
        if self.item_titles and not (self.release_init > 0 and self.release_init_items.endswith("text")):
            raise FedrecError(
                "item-titles is read only by the release-init title-text table: it needs release-init > 0 "
                "and release-init-items text or genres+text"
            )
        if not 0 < self.release_init_pop <= 1:
            raise FedrecError(f"release-init-pop must be in (0, 1], got {self.release_init_pop}")
        if self.release_init_pop >= 1 and self.release_init_items in ("eigen", "genres+eigen", "ease"):
            raise FedrecError(
                f"release-init-items {self.release_init_items!r} needs a Gram part: release-init-pop < 1"
            )
        self.train_modules()  # validates
        if isinstance(self.dp_rows, bool) or not isinstance(self.dp_rows, int) or self.dp_rows < 0:
            raise FedrecError(f"dp-rows must be an integer ≥ 0 (0: off, -1: auto), got {self.dp_rows!r}")
        if self.dp_rows and self.release_init <= 0:
            raise FedrecError(
                "dp-rows trains the rows of the items the release-init release selects: it needs release-init > 0"
            )
        if (self.dot_mix >= 0 or self.dp_train or self.prior_negatives) and self.release_init <= 0:
            raise FedrecError(
                "dot-mix, dp-train and prior-negatives shape the release-init model: they need release-init > 0"
            )
        if self.final_model not in FINAL_MODELS:
            raise FedrecError(
                f"final-model must be auto or one of {', '.join(FINAL_MODELS)}, got {self.final_model!r}"
            )
        if self.dp and self.epsilon <= 0:
            raise FedrecError(f"the ε cap must be > 0, got {self.epsilon}")
        if self.dp and not 0 < self.delta < 1:
            raise FedrecError(f"δ must be in (0, 1), got {self.delta}")
        if self.accountant not in ("prv", "rdp"):
            raise FedrecError(f"accountant must be 'prv' or 'rdp', got {self.accountant!r}")
        if self.eval_privacy not in ("dp", "exact"):
            raise FedrecError(f"eval-privacy must be 'dp' or 'exact', got {self.eval_privacy!r}")
        if self.approach not in APPROACHES:
            raise FedrecError(f"approach must be one of {', '.join(APPROACHES)}, got {self.approach!r}")
        if isinstance(self.gram_limit, bool) or not isinstance(self.gram_limit, int) or self.gram_limit < 2:
            raise FedrecError(f"gram-limit must be an integer ≥ 2, got {self.gram_limit!r}")
        if (
            isinstance(self.select_rule, bool)
            or not isinstance(self.select_rule, int | float)
            or not (math.isfinite(self.select_rule) and self.select_rule >= 0)
        ):
            raise FedrecError(f"select-rule must be a number ≥ 0, got {self.select_rule!r}")
        if (
            isinstance(self.tier, bool)
            or not isinstance(self.tier, int | float)
            or not (math.isfinite(self.tier) and self.tier >= 1)
        ):
            raise FedrecError(f"tier must be a number ≥ 1 (1: no tier), got {self.tier!r}")
        if self.tier > 1 and self.select_rule == 0:
            raise FedrecError(
                "tier scores the items past the M rule's M; with select-rule 0 (an explicit --gram-limit) "
                "there is no M rule — give --select-rule too, or drop --tier"
            )
        if not 0 < self.select_share < 1:
            raise FedrecError(f"select-share must be in (0, 1), got {self.select_share!r}")
        if not self.max_update_norm > 0:
            raise FedrecError(f"max-update-norm must be > 0, got {self.max_update_norm}")
        if self.secagg_max_weight < 0:
            raise FedrecError(f"secagg-max-weight must be >= 0, got {self.secagg_max_weight}")
        if not 0 <= self.fault_dropout < 1:
            raise FedrecError(f"fault-dropout must be in [0, 1), got {self.fault_dropout}")
        self.hidden_sizes()  # validates
        self.cap_overrides()  # validates
        method, _cut = self.aggregation_method()  # validates
        self.crash_rounds()  # validates
        self.adversaries()  # validates
        if self.secagg and method != "fedavg":
            raise FedrecError(
                f"aggregation {self.aggregation!r} needs every tenant's update in the clear, but with "
                "SecAgg+ the server sees only their sum; use fedavg with secagg"
            )

    def head_applies(self) -> bool:
        """Whether the auto release-init resolves to the DP head: DP, approach mlp, dp-mode local-steps."""
        return self.dp and self.approach == "mlp" and self.dp_mode == "local-steps"

    def head_open(self) -> bool:
        """Whether the server may pick approach mlp's head from the federation's size, as ``auto`` does:
        DP, approach mlp, and neither release-init nor release-init-items given (a run that names either
        keeps what it names)."""
        given: dict[str, Any] = getattr(self, "_given")  # noqa: B009 (set in __post_init__)
        return (
            self.dp
            and self.approach == "mlp"
            and given["release_init"] == AUTO_RELEASE_INIT
            and given["release_init_items"] == "auto"
        )

    def _resolve_head(self) -> None:
        """The DP head's keys (AUTO_HEAD) where release-init is auto and the head applies; else each auto
        key's previous plain value (AUTO_NO_HEAD); with the EASE table, AUTO_EASE's DP-SGD keys first. An
        explicit value always wins."""
        set_ = object.__setattr__
        head = self.release_init == AUTO_RELEASE_INIT and self.head_applies()
        if self.release_init == AUTO_RELEASE_INIT:
            set_(self, "release_init", AUTO_HEAD["release_init"] if head else 0.0)
        if self.release_init_items == "auto":
            set_(self, "release_init_items", AUTO_HEAD["release_init_items"] if head else "eigen")
        if self.release_init_pop == 0:
            pop_only = self.release_init_items in ("genres", "text", "genres+text")  # no Gram part needed
            set_(self, "release_init_pop", AUTO_HEAD["release_init_pop"] if head and pop_only else 0.5)
        if self.release_init > 0 and self.release_init_items == "ease":
            if self.dim == 0:
                set_(self, "dim", AUTO_EASE["dim"])
            if self.dot_mix == -1.0:
                set_(self, "dot_mix", AUTO_EASE["dot_mix"])
            if self.dp_train == "" and self.dot_mix >= 0:
                set_(self, "dp_train", AUTO_EASE["dp_train"])
            if self.prior_negatives is False:
                set_(self, "prior_negatives", AUTO_EASE["prior_negatives"])
            if self.max_grad_norm == 0:
                set_(self, "max_grad_norm", AUTO_EASE["max_grad_norm"])
            if self.dp_rows == -1 and self.dp_mode == "cohort":
                set_(self, "dp_rows", AUTO_EASE["dp_rows"])
        if head:
            if self.dot_mix == -1.0:
                set_(self, "dot_mix", AUTO_HEAD["dot_mix"])
            if self.dp_train == "" and self.dot_mix >= 0:
                set_(self, "dp_train", AUTO_HEAD["dp_train"])
            if self.prior_negatives is False:
                set_(self, "prior_negatives", AUTO_HEAD["prior_negatives"])
            for name in ("lr", "max_grad_norm"):
                if getattr(self, name) == 0:
                    set_(self, name, AUTO_HEAD[name])
        if self.max_grad_norm == 0:
            set_(self, "max_grad_norm", AUTO_NO_HEAD["max_grad_norm"])
        if self.dim == 0:
            set_(self, "dim", AUTO_DIM)
        if self.dp_rows == -1:
            set_(self, "dp_rows", 0)

    def with_approach(self, approach: str, head: str = "") -> RunConfig:
        """This run config with ``approach`` named instead of ``auto``, every auto setting resolved again
        from the settings as given (so approach mlp under DP gets the DP head, ``AUTO_HEAD``). ``head``
        "ease" (approach mlp only): the EASE-table head, ``AUTO_EASE_HEAD`` on the keys left auto. Approach
        mlp may be given its head the same way where :meth:`head_open`."""
        if head not in HEADS or (head and approach != "mlp"):
            raise FedrecError(f"unknown head {head!r} for approach {approach!r} (heads of mlp: ease)")
        if self.approach == "mlp" and approach == "mlp" and head:
            if not self.head_open():
                raise FedrecError(
                    "approach mlp's head is fixed by this run config (release-init or release-init-items "
                    "given, or no DP): it is not replaced by another head"
                )
        elif self.approach != "auto" or approach == "auto":
            raise FedrecError(f"only approach auto is resolved to another approach, got {self.approach!r}")
        given = {**self.to_mapping(), "approach": approach}
        if head == "ease":
            for name, value in AUTO_EASE_HEAD.items():
                key = name.replace("_", "-")
                unset = (
                    AUTO_RELEASE_INIT if name == "release_init" else ("auto" if isinstance(value, str) else 0)
                )
                if name == "dp_mode" or given[key] == unset:
                    given[key] = value
        return RunConfig.from_mapping(given)

    def _resolve_auto(self) -> None:
        """Replace every auto setting (0 or "auto") by its value for this run's DP mode (AUTO_*)."""
        self._resolve_head()
        auto = (AUTO_COHORT if self.dp_mode == "cohort" else AUTO_DP) if self.dp else AUTO_NO_DP
        if self.dp_mode == "cohort" and self.cohort_rate == 0:
            object.__setattr__(self, "cohort_rate", AUTO_COHORT_RATE)
        for name, value in auto.items():
            if getattr(self, name) in (0, "auto"):
                object.__setattr__(self, name, value)
        if self.server_lr == 0:
            object.__setattr__(self, "server_lr", 0.01 if self.server_opt == "fedadam" else 1.0)

    @classmethod
    def from_mapping(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Parse ``context.run_config`` (kebab-case keys); unknown keys are an error."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise FedrecError(f"unknown run-config key {key!r}")
            kwargs[name] = value
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """kebab-case scalars, as Flower's run_config holds them: the settings as given (auto values
        unresolved), so ``from_mapping(cfg.to_mapping()) == cfg``."""
        given: dict[str, Any] = getattr(self, "_given")  # noqa: B009 (set in __post_init__)
        return {f.name.replace("_", "-"): given[f.name] for f in fields(self)}

    def resolved_mapping(self) -> dict[str, Any]:
        """kebab-case scalars with every auto setting resolved: what the run used (config.json)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def hidden_sizes(self) -> tuple[int, ...]:
        try:
            sizes = tuple(int(x) for x in str(self.hidden).split(",") if x.strip())
        except ValueError:
            raise FedrecError(f"hidden must be comma-separated integers, got {self.hidden!r}") from None
        if not sizes or min(sizes) < 1:
            raise FedrecError(f"hidden must list positive widths, got {self.hidden!r}")
        return sizes

    def cap_overrides(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in str(self.caps).split(","))):
            tenant, sep, value = part.partition("=")
            try:
                cap = float(value)
            except ValueError:
                cap = float("nan")
            if not sep or not tenant.strip() or not cap > 0:
                raise FedrecError(f"caps must look like 'tenant-0=3,tenant-1=1' with caps > 0, got {part!r}")
            out[tenant.strip()] = cap
        return out

    def aggregation_method(self) -> tuple[str, float]:
        """``("fedavg", 0)``, ``("median", 0)`` or ``("trimmed", β)`` with 0 < β < 0.5 cut at each end."""
        text = str(self.aggregation).strip()
        if text in ("fedavg", "median"):
            return text, 0.0
        name, sep, value = text.partition(":")
        try:
            beta = float(value) if name == "trimmed" and sep else float("nan")
        except ValueError:
            beta = float("nan")
        if not 0 < beta < 0.5:
            raise FedrecError(
                f"aggregation must be fedavg, median or trimmed:B with 0 < B < 0.5, got {self.aggregation!r}"
            )
        return "trimmed", beta

    def train_modules(self) -> tuple[str, ...]:
        """``dp-train`` as module names (() = all), plus ``item_rows`` with dp-rows; "mix" needs dot-mix >= 0."""
        allowed = ("mix", "mlp", "genre_proj", "user_feats", "hour_emb", "weekday_emb")
        names = tuple(x.strip() for x in str(self.dp_train).split(",") if x.strip())
        if self.dp_rows and names and "item_rows" not in names:
            names = (*names, "item_rows")  # dp-rows trains its rows whatever else dp-train lists
        bad = [x for x in names if x not in (*allowed, "item_rows")]
        if bad:
            raise FedrecError(f"dp-train lists unknown module(s) {bad}; choose from {', '.join(allowed)}")
        if "mix" in names and self.dot_mix < 0:
            raise FedrecError("dp-train 'mix' needs dot-mix >= 0 (the learned weight's start)")
        return names

    def eval_exact(self) -> bool:
        """Whether evaluation sums leave the tenants exactly (not covered by ε): exact mode or no DP."""
        return self.eval_privacy == "exact" or not self.dp

    def planned_rounds(self) -> int:
        """Rounds a tenant is charged for: the DP-SGD rounds, plus the initialising release if any."""
        return self.num_server_rounds + (1 if self.release_init > 0 else 0)

    def cap_for(self, tenant: str) -> float:
        return self.cap_overrides().get(tenant, self.epsilon)

    # ---------------------------------------------------------- simulated faults (public, seeded)
    def crash_rounds(self) -> dict[str, set[int]]:
        """``fault-crash`` as {tenant: rounds in which its client process dies mid-round}."""
        out: dict[str, set[int]] = {}
        for part in filter(None, (p.strip() for p in str(self.fault_crash).split(","))):
            tenant, sep, rnd = part.partition("@")
            if not sep or not tenant.strip() or not rnd.strip().isdigit() or int(rnd) < 1:
                raise FedrecError(f"crash must look like 'tenant-1@3' (tenant@round >= 1), got {part!r}")
            out.setdefault(tenant.strip(), set()).add(int(rnd))
        return out

    def adversaries(self) -> dict[str, str]:
        """``fault-adversary`` as {tenant: kind}; kinds are listed in :data:`ADVERSARY_KINDS`."""
        out: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in str(self.fault_adversary).split(","))):
            tenant, sep, kind = part.partition(":")
            kind = kind.strip()
            if not sep or not tenant.strip() or not _ADVERSARY_RE.fullmatch(kind):
                raise FedrecError(
                    f"adversary must look like 'tenant-0:KIND' with KIND one of {ADVERSARY_KINDS}, "
                    f"got {part!r}"
                )
            out[tenant.strip()] = kind
        return out

    def drops_out(self, tenant: str, round_: int) -> bool:
        """Whether ``tenant`` misses ``round_`` under ``fault-dropout`` (a public, seeded draw)."""
        if self.fault_dropout <= 0:
            return False
        digest = hashlib.sha256(f"dropout:{self.seed}:{tenant}:{round_}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.fault_dropout

    def planned_faults(self, tenants: list[str], round_: int) -> dict[str, Any]:
        """What the simulated faults do in ``round_`` (for rounds.jsonl); empty without faults."""
        out: dict[str, Any] = {}
        drops = [t for t in tenants if self.drops_out(t, round_)]
        crashes = sorted(t for t, rounds in self.crash_rounds().items() if round_ in rounds)
        if drops:
            out["dropout"] = drops
        if crashes:
            out["crash"] = crashes
        if self.fault_adversary:
            out["adversary"] = self.adversaries()
        return out


#: Adversary kinds (simulation): corrupt the update after honest training.
ADVERSARY_KINDS = "nan|inf|scale=F|signflip|shape|dtype|keys|users=N"
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_ADVERSARY_RE = re.compile(rf"nan|inf|signflip|shape|dtype|keys|scale={_NUM}|users=-?\d+")
