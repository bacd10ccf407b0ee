"""The configuration of a federated run, parsed once from Flower's ``context.run_config``.

Defaults live in ``[tool.flwr.app.config]`` of pyproject.toml (kebab-case, scalars only); this
dataclass mirrors them with a comment on each and rejects unknown keys, so a typo is an error rather
than a silent default. Node facts (tenant folder, key file, state dir) never come from here: they
come from ``node_config`` (deployment) or ``partition-id`` + ``fed-dir`` (simulation).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from shared_model.errors import FedrecError


@dataclass(frozen=True)
class RunConfig:
    num_server_rounds: int = 3  # federated rounds
    fed_dir: str = ""  # simulation: folder written by `fedrec prepare` (tenant-<i>/, keys/, catalog.json)
    catalog: str = ""  # public catalogue JSON (default: <fed-dir>/catalog.json)
    run_dir: str = ""  # where the ServerApp writes RUN_DIR files (absolute path on the coordinator)
    run_name: str = "run"  # names the per-run state dir of each tenant (budget + ledger)
    num_tenants: int = 0  # tenants the server waits for (0: all of federation.json)
    min_tenants: int = 1  # fewest successful tenants for a round to count
    node_wait_timeout: float = 120.0  # seconds to wait for the SuperNodes to connect
    round_timeout: float = 1800.0  # seconds to wait for the replies of one round
    dp: bool = True  # user-level DP-SGD; false = same pipeline without clipping or noise
    epsilon: float = 8.0  # each tenant's user-level ε cap for the whole run
    delta: float = 1e-5  # δ; must be < 1/users of every tenant
    caps: str = ""  # per-tenant caps overriding epsilon, e.g. "tenant-0=3,tenant-2=1"
    accountant: str = "prv"  # prv | rdp (never gdp for the ledger)
    max_grad_norm: float = 1.0  # per-user clipping bound C
    local_epochs: float = 1.0  # expected passes over a tenant's users per round
    batch_users: int = 64  # expected users per DP step (Poisson rate q = 1/ceil(n/batch))
    lr: float = 3e-3  # local Adam learning rate
    dim: int = 32  # embedding width
    hidden: str = "64,32"  # MLP hidden widths
    max_history: int = 50  # history items per training example
    targets: int = 20  # held-out positives per training example
    negatives: int = 4  # sampled negatives per positive
    eval_every: int = 1  # validation every N rounds (test always at the end)
    seed: int = 0  # model init, sampling and noise seeds derive from this

    def __post_init__(self) -> None:
        if self.num_server_rounds < 1:
            raise FedrecError(f"num-server-rounds must be >= 1, got {self.num_server_rounds}")
        if self.dp and self.epsilon <= 0:
            raise FedrecError(f"the ε cap must be > 0, got {self.epsilon}")
        if self.dp and not 0 < self.delta < 1:
            raise FedrecError(f"δ must be in (0, 1), got {self.delta}")
        if self.accountant not in ("prv", "rdp"):
            raise FedrecError(f"accountant must be 'prv' or 'rdp', got {self.accountant!r}")
        self.hidden_sizes()  # validates
        self.cap_overrides()  # validates

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
        """kebab-case scalars, as Flower's run_config holds them."""
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

    def cap_for(self, tenant: str) -> float:
        return self.cap_overrides().get(tenant, self.epsilon)
