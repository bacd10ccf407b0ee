"""``fedrec centralized`` (the non-federated, non-private reference) and ``fedrec simulate`` (the
multi-tenant federated run), thin over :mod:`fedrec.simulations.driver`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedrec.shared_model.errors import FedrecError
from fedrec.simulations.cli.common import (
    ColumnsOpt,
    DataOpt,
    MinRatingOpt,
    SeedOpt,
    SynthAlphaOpt,
    SynthItemsOpt,
    SynthNoiseOpt,
    SynthPerUserOpt,
    SynthProfileOpt,
    SynthRankOpt,
    SynthUsersOpt,
    TestOpt,
    err_console,
    load_prepared,
    out_console,
    print_metrics_table,
    print_run_summary,
    synth_spec,
)


def register(app: typer.Typer) -> None:
    app.command()(centralized)
    app.command()(simulate)


# ------------------------------------------------------------------ centralized
def centralized(
    out: Annotated[Path, typer.Option("--out", help="RUN_DIR to write (atomically).")],
    data: DataOpt = "synthetic",
    columns: ColumnsOpt = None,
    test: TestOpt = None,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", min=1, help="Maximum epochs, early stopping on validation [150]."),
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(
            "--patience",
            min=1,
            help="Epochs without improvement before stopping [auto: 600 steps' worth, 5–40; 40 on ml-100k].",
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", min=0.0, help="Adam learning rate [3e-3].")] = None,
    seed: SeedOpt = 0,
    min_rating: MinRatingOpt = None,
    synth_users: SynthUsersOpt = None,
    synth_items: SynthItemsOpt = None,
    synth_profile: SynthProfileOpt = "movielens",
    synth_per_user: SynthPerUserOpt = None,
    synth_rank: SynthRankOpt = None,
    synth_noise: SynthNoiseOpt = None,
    synth_alpha: SynthAlphaOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing RUN_DIR.")] = False,
) -> None:
    """Train the MLP recommender on all data (no federation, no DP) and compare with baselines."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedrec.simulations.driver.centralized import CentralizedConfig, run_centralized
    from fedrec.simulations.driver.rundir import check_out_dir

    check_out_dir(out, overwrite=overwrite)
    prepared = load_prepared(
        data,
        columns,
        seed,
        min_rating,
        synth_users,
        synth_items,
        test,
        synth=synth_spec(synth_profile, synth_per_user, synth_rank, synth_noise, synth_alpha),
    )
    given = {"epochs": epochs, "patience": patience, "lr": lr}
    cfg = CentralizedConfig(seed=seed, **{k: v for k, v in given.items() if v is not None})  # type: ignore[arg-type]
    resolved = {"data": data, "test": test, "columns": columns, "min_rating": min_rating, "seed": seed}
    with Progress(
        TextColumn("[bold]epoch"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err_console,
    ) as progress:
        task = progress.add_task("train", total=cfg.epochs, info="")

        def on_epoch(epoch: int, loss: float, ndcg: float, improved: bool) -> None:
            star = "*" if improved else " "
            info = f"loss {loss:.4f}  val NDCG@10 {ndcg:.4f}{star}"
            progress.update(task, completed=epoch, info=info)
            if not err_console.is_terminal:  # a log file gets no live bar: one line per epoch instead
                err_console.print(f"epoch {epoch}/{cfg.epochs}  {info}", highlight=False)

        metrics = run_centralized(
            prepared, cfg, out, overwrite=overwrite, resolved_config=resolved, on_epoch=on_epoch
        )
    rows = {"mlp (this run)": metrics, **metrics["baselines"]}
    print_metrics_table(f"test metrics — {metrics['dataset']['source']}", rows)
    out_console.print(f"{metrics['seconds']:.1f} s; model and metrics in {out}")


# ------------------------------------------------------------------ simulate
def simulate(
    out: Annotated[
        Path | None, typer.Option("--out", help="RUN_DIR to write (atomically); not with --resume.")
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option("--rounds", min=1, help="Federated rounds [auto: 5 with DP, 24 with --no-dp]."),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Data source to partition (default: synthetic); or --federation."),
    ] = None,
    federation: Annotated[
        Path | None,
        typer.Option("--federation", help="A folder written by `fedrec prepare` (instead of --data)."),
    ] = None,
    tenants: Annotated[int, typer.Option("--tenants", min=1, help="Tenants to partition --data into.")] = 3,
    partition: Annotated[str, typer.Option("--partition", help="iid | dirichlet:A | by:FIELD")] = "iid",
    k_anonymity: Annotated[
        int, typer.Option("--k-anonymity", min=1, help="k for the tenants' quasi-identifiers.")
    ] = 5,
    epsilon: Annotated[
        float, typer.Option("--epsilon", help="Each tenant's user-level ε cap for the whole run.")
    ] = 8.0,
    delta: Annotated[float, typer.Option("--delta", help="δ (must be < 1/users of every tenant).")] = 1e-5,
    no_dp: Annotated[bool, typer.Option("--no-dp", help="Same pipeline without clipping or noise.")] = False,
    caps: Annotated[str, typer.Option("--caps", help="Per-tenant caps, e.g. 'tenant-0=3,tenant-1=1'.")] = "",
    local_epochs: Annotated[
        float | None,
        typer.Option("--local-epochs", help="Expected passes per round [auto: 1 with DP, 5 with --no-dp]."),
    ] = None,
    batch_users: Annotated[
        int, typer.Option("--batch-users", min=1, help="Expected users per DP step.")
    ] = 64,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Local Adam learning rate [auto: 0.3 for the DP head of --approach mlp, else 3e-3 with DP, "
            "0.01 with --no-dp].",
        ),
    ] = None,
    max_grad_norm: Annotated[
        float | None,
        typer.Option(
            "--max-grad-norm", help="Per-user clipping bound C [auto: 0.05 for the DP head, else 1]."
        ),
    ] = None,
    approach: Annotated[
        str,
        typer.Option(
            "--approach",
            help="auto (pick from tenant sizes, ε and the noise mode: DP-EASE where enough users share the "
            "noise (from 5 000 users the EASE-table head on it), else the DP MLP head where the catalogue has "
            "genres, else DP "
            "popularity; docs/FEDERATION.md) | mlp (DP-SGD rounds; under DP the head auto would train: the "
            "EASE-table head where auto picks it, else the DP MLP head; --release-init or "
            "--release-init-items fixes it) | "
            "dp_ease | dp_popularity (one DP item release per tenant; --rounds does not apply) | "
            "dp_two_stage (catalogues above --gram-limit: a DP popularity release selects the top "
            "--gram-limit items, DP-EASE on their Gram; two releases, --select-share of the μ² budget on the first).",
        ),
    ] = "auto",
    gram_limit: Annotated[
        int | None,
        typer.Option(
            "--gram-limit",
            min=2,
            help="Most items one item–item Gram release covers (O(M³) fit, M(M+1)/2 floats per tenant) "
            "[4000]; above it auto picks dp_two_stage. Given explicitly, dp_two_stage's Gram covers exactly "
            "this many items (the M rule is off unless --select-rule is given too).",
        ),
    ] = None,
    select_rule: Annotated[
        float | None,
        typer.Option(
            "--select-rule",
            min=0.0,
            help="dp_two_stage: the M rule's constant c — the Gram covers the items whose stage-1 noisy "
            "popularity is ≥ c × the Gram's noise edge per item (s₂·√M), at most --gram-limit; 0: exactly "
            "--gram-limit items [1, chosen on validation, docs/PRIVACY_UTILITY.md].",
        ),
    ] = None,
    select_share: Annotated[
        float,
        typer.Option("--select-share", help="dp_two_stage: share of the μ² budget on the selecting release."),
    ] = 0.1,
    tier: Annotated[
        float,
        typer.Option(
            "--tier",
            min=1.0,
            help="dp_two_stage with the M rule: the Gram covers this × M items; DP-EASE fits the top M, the "
            "rest are scored by a ridge regression on them (same release, no ε of its own) [1: no tier; "
            "1.5 gained 1–2 % on a 30k × 40k validation set and lost 2–3 % on ml-100k, docs/PRIVACY_UTILITY.md].",
        ),
    ] = 1.0,
    eval_privacy: Annotated[
        str,
        typer.Option(
            "--eval-privacy",
            help="exact: exact validation/test sums every round, NOT covered by ε (labelled in every report; "
            "the simulation default, for research) | dp: only the final test sums leave a tenant, "
            "Gaussian-noised and charged (the deployment default).",
        ),
    ] = "exact",
    release_init: Annotated[
        float | None,
        typer.Option(
            "--release-init",
            help="With --approach mlp: spend this share of each tenant's ε on one item release (round 1) "
            "that initialises the MLP's prior and frozen item embeddings; DP-SGD gets the rest. 0: off "
            "(plain DP-SGD of the whole MLP). [auto: the DP head under DP with --dp-mode local-steps — "
            "0.9, genres, --release-init-pop 1, --dot-mix 0, --dp-train mix, --prior-negatives, --lr 0.3, "
            "--max-grad-norm 0.05, each unless given; else 0].",
        ),
    ] = None,
    release_init_items: Annotated[
        str,
        typer.Option(
            "--release-init-items",
            help="With --release-init: the frozen item table: eigen (the release's EigenGram vectors) | "
            "genres (public genre vectors, no ε) | genres+eigen | text (public title embeddings of a "
            "bundled sentence model, no ε; needs fedrec[text]) | genres+text | ease (DP-EASE's item–item "
            "model of the release as a history table and a candidate table; start --dot-mix high, e.g. "
            "300, the value chosen on validation) [auto: genres for the DP head, else eigen].",
        ),
    ] = "auto",
    item_titles: Annotated[
        str,
        typer.Option(
            "--item-titles",
            help="With --release-init-items text: a CSV of public item titles (item or movieId column, "
            "title column) [default: the catalogue's titles].",
        ),
    ] = "",
    release_init_pop: Annotated[
        float | None,
        typer.Option(
            "--release-init-pop",
            help="With --release-init: the release's popularity share ρ (1 = popularity only; needs "
            "--release-init-items genres, text or genres+text) [auto: 1 for the DP head, else 0.5].",
        ),
    ] = None,
    dim: Annotated[
        int | None,
        typer.Option(
            "--dim",
            min=1,
            help="Embedding width of the MLP (and of the release-init item table; with --release-init-items "
            "ease, how many of DP-EASE's components the table keeps) [auto: 256 with --release-init-items "
            "ease, else 32].",
        ),
    ] = None,
    dot_mix: Annotated[
        float,
        typer.Option(
            "--dot-mix",
            help="With --release-init: a learned weight on the u·v term, started at this value, with the "
            "side embeddings started at 0 [< 0: off, weight fixed at 1].",
        ),
    ] = -1.0,
    dp_train: Annotated[
        str,
        typer.Option(
            "--dp-train",
            help="With --release-init: the only modules DP-SGD trains, comma-separated: mix, mlp, "
            "genre_proj, user_feats, hour_emb, weekday_emb [all but the frozen item table].",
        ),
    ] = "",
    prior_negatives: Annotated[
        bool,
        typer.Option(
            "--prior-negatives",
            help="With --release-init: draw training negatives from the DP prior, so DP-SGD learns what a "
            "user's items have beyond popularity.",
        ),
    ] = False,
    dp_rows: Annotated[
        int | None,
        typer.Option(
            "--dp-rows",
            min=0,
            help="With --release-init: DP-SGD also trains the embedding rows of the M items the release's DP "
            "popularity ranks highest, and only those (DP-FEST-style sparsity: M·dim numbers noised, not "
            "catalogue·dim); 0 = off [auto: 100 with --release-init-items ease in cohort rounds, else 0].",
        ),
    ] = None,
    dp_mode: Annotated[
        str,
        typer.Option(
            "--dp-mode",
            help="How DP-SGD trains the MLP: local-steps (local-epochs of local Adam DP-SGD steps per round) | "
            "cohort (DP-FedAvg-style: each round one noisy clipped gradient sum of a Poisson cohort per "
            "tenant, the server optimizer on the noisy mean; with --secagg the noise is split between "
            "tenants; auto: 15 rounds, fedadam, untuned; docs/FEDERATION.md).",
        ),
    ] = "local-steps",
    cohort_rate: Annotated[
        float | None,
        typer.Option(
            "--cohort-rate", help="With --dp-mode cohort: Poisson rate of each round's cohort [0.5]."
        ),
    ] = None,
    secagg: Annotated[
        bool,
        typer.Option("--secagg", help="SecAgg+: the server sees only the masked sum of the tenants' deltas."),
    ] = False,
    aggregation: Annotated[
        str,
        typer.Option("--aggregation", help="fedavg | median | trimmed:B (robust rules refuse --secagg)."),
    ] = "fedavg",
    max_update_norm: Annotated[
        float | None,
        typer.Option(
            "--max-update-norm",
            help="L2 bound on one tenant's update per round [auto: 20 with DP, 50 without].",
        ),
    ] = None,
    server_opt: Annotated[
        str,
        typer.Option(
            "--server-opt",
            help="Server optimizer on the aggregated delta: auto (fedavg with DP, fedavgm without) | fedavg "
            "| fedavgm | fedadam.",
        ),
    ] = "auto",
    server_lr: Annotated[
        float | None,
        typer.Option("--server-lr", help="Server step size [1 for fedavg/fedavgm, 0.01 for fedadam]."),
    ] = None,
    server_momentum: Annotated[
        float, typer.Option("--server-momentum", help="FedAvgM server momentum.")
    ] = 0.5,
    final_model: Annotated[
        str,
        typer.Option(
            "--final-model",
            help="auto (best-val without DP, last with DP) | best-val (round with the best federated "
            "validation NDCG@10) | last.",
        ),
    ] = "auto",
    round_timeout: Annotated[
        float, typer.Option("--round-timeout", help="Seconds to wait for a round (each SecAgg+ stage).")
    ] = 1800.0,
    dropout: Annotated[
        float, typer.Option("--dropout", help="Simulated: each tenant misses a round with probability P.")
    ] = 0.0,
    crash: Annotated[
        list[str] | None,
        typer.Option("--crash", help="Simulated: TENANT@ROUND, the tenant's process dies mid-round."),
    ] = None,
    adversary: Annotated[
        list[str] | None,
        typer.Option(
            "--adversary", help="Simulated: TENANT:nan|inf|scale=F|signflip|shape|dtype|keys|users=N."
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue the interrupted run to this RUN_DIR from its checkpoint."),
    ] = None,
    columns: ColumnsOpt = None,
    test: TestOpt = None,
    seed: SeedOpt = 0,
    min_rating: MinRatingOpt = None,
    synth_users: SynthUsersOpt = None,
    synth_items: SynthItemsOpt = None,
    synth_profile: SynthProfileOpt = "movielens",
    synth_per_user: SynthPerUserOpt = None,
    synth_rank: SynthRankOpt = None,
    synth_noise: SynthNoiseOpt = None,
    synth_alpha: SynthAlphaOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing RUN_DIR.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Flower's and Ray's logs.")] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Join this running Ray cluster (IP:PORT of its head, as `ray start --head` prints) "
            "instead of starting a local one.",
        ),
    ] = None,
) -> None:
    """Multi-tenant federated training with user-level DP (Flower simulation, one node per tenant)."""
    from fedrec.shared_model.runconfig import AUTO_RELEASE_INIT, RunConfig
    from fedrec.simulations.driver.rundir import check_out_dir
    from fedrec.simulations.driver.simulate import resume as resume_run
    from fedrec.simulations.driver.simulate import simulate as run

    def log(line: str) -> None:
        err_console.print(f"[dim]{line}[/dim]", highlight=False, soft_wrap=True)

    if resume is not None:
        if out is not None or data is not None or federation is not None:
            raise FedrecError(
                "--resume RUN_DIR takes the run's own configuration; drop --out/--data/--federation"
            )
        print_run_summary(resume, resume_run(resume, verbose=verbose, log=log, ray_address=ray_address))
        return
    if out is None:
        raise FedrecError("give --out RUN_DIR (or --resume RUN_DIR to continue an interrupted run)")
    if data is not None and federation is not None:
        raise FedrecError("give either --data or --federation, not both")
    if test is not None and data is None:
        raise FedrecError(
            "--test TEST goes with --data TRAIN (a federation folder already holds its test sets)"
        )
    if secagg and aggregation.strip() != "fedavg":
        raise FedrecError(
            f"--aggregation {aggregation} needs every update in the clear; with --secagg the server sees "
            "only their sum (use fedavg)"
        )
    check_out_dir(out, overwrite=overwrite)
    cfg = RunConfig(
        num_server_rounds=rounds or 0,
        dp=not no_dp,
        epsilon=epsilon,
        delta=delta,
        caps=caps,
        local_epochs=local_epochs or 0.0,
        batch_users=batch_users,
        lr=lr or 0.0,
        max_grad_norm=max_grad_norm or 0.0,
        seed=seed,
        approach=approach.strip().replace("-", "_"),
        gram_limit=RunConfig.gram_limit if gram_limit is None else gram_limit,
        select_rule=(RunConfig.select_rule if gram_limit is None else 0.0)
        if select_rule is None
        else select_rule,
        select_share=select_share,
        tier=tier,
        release_init=AUTO_RELEASE_INIT if release_init is None else release_init,
        release_init_items=release_init_items.strip(),
        item_titles=item_titles.strip(),
        release_init_pop=release_init_pop or 0.0,
        dot_mix=dot_mix,
        dim=dim or 0,
        dp_train=dp_train.strip(),
        prior_negatives=prior_negatives,
        dp_rows=-1 if dp_rows is None else dp_rows,
        dp_mode=dp_mode.strip(),
        cohort_rate=cohort_rate or 0.0,
        secagg=secagg,
        eval_privacy=eval_privacy.strip(),
        aggregation=aggregation.strip(),
        max_update_norm=max_update_norm or 0.0,
        server_opt=server_opt.strip(),
        server_lr=server_lr or 0.0,
        server_momentum=server_momentum,
        final_model=final_model.strip(),
        round_timeout=round_timeout,
        fault_dropout=dropout,
        fault_crash=",".join(crash or []),
        fault_adversary=",".join(adversary or []),
    )
    prepare = None
    if federation is None:
        from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation

        prepared = load_prepared(
            data or "synthetic",
            columns,
            seed,
            min_rating,
            synth_users,
            synth_items,
            test,
            synth=synth_spec(synth_profile, synth_per_user, synth_rank, synth_noise, synth_alpha),
        )

        def prepare(fed_dir: Path) -> None:
            prepare_federation(
                prepared,
                fed_dir,
                PrepareConfig(tenants=tenants, partition=partition, k_anonymity=k_anonymity, seed=seed),
            )

    metrics = run(
        cfg,
        out,
        federation=federation,
        prepare=prepare,
        overwrite=overwrite,
        verbose=verbose,
        log=log,
        ray_address=ray_address,
    )
    print_run_summary(out, metrics)
