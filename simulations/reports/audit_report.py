"""The audit report: ``audit.json``, ``audit.md`` (+ PNGs beside it) and one self-contained ``audit.html``.

The HTML embeds its plots as base64 PNGs and has no external reference, so it can be mailed or
archived as a single file. Every check is listed with pass/fail and, for failures, each finding
with its tenant, ledger line and round. The scope section says what the numbers do and do not cover.
"""

from __future__ import annotations

import base64
import html
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedrec.privacy.audit import PLD_RTOL, RDP_RTOL, REPLAY_TOLERANCE
from fedrec.simulations.reports.audit import (
    AuditOutcome,
    EmpiricalConfig,
    Log,
    RunFiles,
    _released,
    check_run,
    empirical_audit,
    load_run,
)
from fedrec.simulations.reports.dpsgd_audit import GradientAuditConfig, gradient_audit
from fedrec.simulations.reports.release_audit import ReleaseAuditConfig, release_audit

ACCOUNTANT_LABELS = {
    "opacus_prv": "Opacus PRV",
    "dp_accounting_pld": "dp_accounting PLD",
    "opacus_rdp": "Opacus RDP",
    "dp_accounting_rdp": "dp_accounting RDP",
}


def scope_lines(outcome: AuditOutcome, run: RunFiles) -> list[str]:
    """What this audit covers and what it does not (stated in every report)."""
    p = run.privacy
    env = outcome.environment
    adjacency = p.get("adjacency_text") or (
        "add/remove one user of one tenant (this run predates the adjacency record; its user counts, "
        "loss and evaluation sums were sent exactly and are NOT covered)"
    )
    lines = [
        "Unit of privacy: one user of one tenant (user-level DP; Poisson sampling over users).",
        f"Adjacency: {adjacency}. ε is replayed under it; every field a tenant sends is listed with its "
        "treatment in docs/TRANSCRIPT.md.",
        f"User counts: {p.get('user_counts', 'exact (NOT covered)')}. Evaluation: "
        f"{p.get('evaluation', 'exact sums every round (NOT covered by ε)')}.",
        "Threat model: each tenant trusts only itself with its users' data; the coordinator sees per-"
        "tenant budget figures and (without SecAgg+) each tenant's noised, clipped update; model "
        "consumers see top-K lists. The DP guarantee bounds what any of them learns about one user.",
        f"Noise: {p.get('noise', 'local: each tenant adds its own Gaussian noise')}. Each tenant's ε is "
        "for its own release; the server's aggregate adds no further protection in the accounting.",
        f"Accountant recorded: {p.get('accountant')}; δ = {p.get('delta')}; cross-checked with Opacus "
        "PRV/RDP and Google dp_accounting PLD/RDP.",
        "Covered: the ledger's integrity (hash chain and the heads the coordinator recorded per round), "
        "caps, δ < 1/users, Poisson sampling, steps vs plan, ε recomputed from the recorded mechanism.",
        "Not covered: a person who is a user of two tenants composes across them (ε adds up at least; "
        "no tenant can see it). The code that trained is trusted to have used the recorded σ, q and steps: the "
        "ledger proves what was claimed, the empirical audit only tests the claim on a replica.",
        f"secure_mode: {p.get('secure_mode')} — Opacus' secure RNG needs torchcsprng "
        f"({env.get('torchcsprng', '?')}); noise comes from torch's default generator, which is not "
        "cryptographically secure (floating-point attacks on the Gaussian sampler are out of scope).",
    ]
    if not run.dp:
        lines.insert(0, "THIS RUN HAS NO DP (--no-dp): no ε is claimed; only the empirical attack applies.")
    return lines


# ---------------------------------------------------------------- plots


def _plots(outcome: AuditOutcome, run: RunFiles) -> dict[str, bytes]:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out: dict[str, bytes] = {}

    def save(name: str, fig: Any) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        out[name] = buf.getvalue()

    tenants = outcome.checks.tenants
    replays = {t: a.replay for t, a in tenants.items() if a.replay is not None and a.replay.rounds}
    if replays:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for i, (t, rep) in enumerate(sorted(replays.items())):
            color = f"C{i % 10}"
            ax.plot(rep.rounds, rep.recorded, "o", color=color, label=f"{t} recorded")
            ax.plot(rep.rounds, rep.replayed, "-", color=color, alpha=0.7, label=f"{t} replayed")
            cap = tenants[t].cap
            if cap is not None:
                ax.axhline(cap, color=color, linestyle="--", linewidth=1, label=f"{t} cap {cap:g}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("cumulative ε")
        ax.set_title("ε per round: recorded vs replayed from the ledger, with caps")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        save("epsilon_rounds.png", fig)

        fig, ax = plt.subplots(figsize=(7, 3.8))
        names = sorted(replays)
        series = ["recorded", *ACCOUNTANT_LABELS, "empirical"]
        width = 0.8 / len(series)
        emp = outcome.empirical
        for j, key in enumerate(series):
            vals = []
            for t in names:
                rep = replays[t]
                if key == "recorded":
                    vals.append(rep.recorded[-1])
                elif key == "empirical":  # the larger of the data- and gradient-canary bounds
                    grad = outcome.gradient
                    vals.append(
                        max(
                            emp.epsilon_lb if emp is not None and emp.tenant == t else 0.0,
                            grad.epsilon_lb if grad is not None and grad.tenant == t else 0.0,
                        )
                    )
                else:
                    vals.append(rep.final.get(key, 0.0))
            label = {"recorded": "claimed (ledger)", "empirical": "empirical lower bound"}.get(
                key, ACCOUNTANT_LABELS.get(key, key)
            )
            xs = [i + (j - len(series) / 2 + 0.5) * width for i in range(len(names))]
            ax.bar(xs, vals, width=width, label=label)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("ε")
        ax.set_title("claimed vs recomputed vs empirical ε per tenant")
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
        ax.grid(alpha=0.3, axis="y")
        save("epsilon_compare.png", fig)

    rel = outcome.release
    if rel is not None:
        import numpy as np

        from fedrec.privacy.empirical import gdp_tpr

        fpr, tpr = np.asarray(rel.roc[0]), np.asarray(rel.roc[1])
        grid = np.logspace(-4, 0, 200)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, log_scale in zip(axes, (False, True), strict=True):
            ax.plot(
                fpr,
                tpr,
                "-",
                color="C3",
                label=f"empirical ({len(rel.scores_in) + len(rel.scores_out)} held-out trials)",
            )
            ax.plot(
                grid,
                gdp_tpr(grid, rel.claim.mu),
                "--",
                color="C0",
                label=f"claimed: Gaussian μ = {rel.claim.mu:.3f}",
            )
            if math.isfinite(rel.fit.mu):
                ax.plot(
                    grid,
                    gdp_tpr(grid, rel.fit.mu),
                    ":",
                    color="C2",
                    label=f"fitted: Gaussian μ = {rel.fit.mu:.3f}",
                )
            ax.plot([1e-4, 1], [1e-4, 1], color="0.7", linewidth=0.8, label="chance")
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            if log_scale:
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlim(1e-3, 1)
                ax.set_ylim(1e-3, 1)
                ax.set_title("log scale: the low-FPR end sets ε")
            else:
                ax.set_title("trade-off curve: canary in vs out")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, loc="lower right")
        fig.suptitle(
            f"release of {rel.claim.tenant}: empirical test vs the claimed Gaussian curve", fontsize=10
        )
        save("release_tradeoff.png", fig)

    def score_histogram(
        name: str, scores: Sequence[float], included: Sequence[bool], bins: int, xlabel: str, title: str
    ) -> None:
        """Included vs excluded canaries' scores, one histogram (both empirical audits draw one)."""
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ins = [s for s, i in zip(scores, included, strict=True) if i]
        outs = [s for s, i in zip(scores, included, strict=True) if not i]
        ax.hist([ins, outs], bins=bins, label=["included canaries", "excluded canaries"], alpha=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("canaries")
        ax.set_title(title)
        ax.legend(fontsize=8)
        save(name, fig)

    emp = outcome.empirical
    if emp is not None:
        score_histogram(
            "canary_scores.png", emp.scores, emp.included, 40,
            "membership score (standardised lift of held-out canary items)",
            f"canary scores, {emp.tenant} replica ({'DP' if emp.dp else 'no DP'})",
        )  # fmt: skip
    grad = outcome.gradient
    if grad is not None:
        score_histogram(
            "dpsgd_canary_scores.png", grad.scores, grad.included_mask, 50,
            "log-likelihood ratio of the canary's per-step privatized gradients",
            f"gradient canaries, {grad.tenant} replica: ε ≥ {grad.epsilon_lb:.2f} vs claimed {grad.claim.epsilon:.2f}",
        )  # fmt: skip
    return out


# ---------------------------------------------------------------- JSON


def audit_json(outcome: AuditOutcome, run: RunFiles) -> dict[str, Any]:
    checks = outcome.checks
    doc: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "passed": outcome.passed,
        "failed_checks": sorted({f"{c.name}:{c.tenant or 'run'}" for c in outcome.failed()}),
        "unit": run.privacy.get("unit"),
        "adjacency": run.privacy.get("adjacency"),
        "evaluation": run.privacy.get("evaluation"),
        "dp": run.dp,
        "accountant": run.privacy.get("accountant"),
        "delta": run.privacy.get("delta"),
        "tolerances": {
            "replay_abs": REPLAY_TOLERANCE,
            "pld_vs_prv_rel": PLD_RTOL,
            "rdp_below_prv_rel": RDP_RTOL,
        },
        "scope": scope_lines(outcome, run),
        "checks": [
            {
                "name": c.name,
                "tenant": c.tenant,
                "passed": c.passed,
                "note": c.note,
                "findings": [asdict(f) for f in c.findings],
            }
            for c in [
                *checks.all_checks(),
                *(outcome.release.checks() if outcome.release else []),
                *(outcome.gradient.checks() if outcome.gradient else []),
            ]
        ],
        "tenants": {},
        "seconds": {"checks": round(checks.seconds, 3), "total": round(outcome.seconds, 3)},
        "environment": outcome.environment,
    }
    for t, a in checks.tenants.items():
        rep = a.replay
        doc["tenants"][t] = {
            "users": a.users,
            "cap": a.cap,
            "entries": a.entries,
            "epsilon_recorded": rep.recorded[-1] if rep and rep.recorded else None,
            "epsilon_replayed": rep.replayed[-1] if rep and rep.replayed else None,
            "max_replay_error": rep.max_error if rep else None,
            "accountants": dict(rep.final) if rep else {},
            "rounds": list(rep.rounds) if rep else [],
            "epsilon_by_round": {"recorded": list(rep.recorded), "replayed": list(rep.replayed)}
            if rep
            else {},
        }
    if outcome.release is not None:
        doc["empirical_release"] = outcome.release.to_json()
    if outcome.gradient is not None:
        doc["empirical_dpsgd"] = outcome.gradient.to_json()
    emp = outcome.empirical
    if emp is not None:
        doc["empirical"] = {
            "tenant": emp.tenant,
            "dp": emp.dp,
            "claimed_epsilon": emp.claimed_epsilon,
            "epsilon_lower_bound": emp.epsilon_lb,
            "method": "one-run (Steinke, Nasr, Jagielski 2023), Bonferroni over guess sets",
            "confidence": emp.one_run.confidence,
            "canaries": emp.one_run.m,
            "guesses_in": emp.one_run.k_in,
            "guesses_out": emp.one_run.k_out,
            "correct": emp.one_run.correct,
            "clopper_pearson_lb": emp.clopper_pearson_lb,
            "mechanism": emp.mechanism,
            "seconds": round(emp.seconds, 3),
            "passed": emp.check().passed,
        }
    return doc


# ---------------------------------------------------------------- Markdown / HTML


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return "∞" if math.isinf(x) else f"{x:.{digits}g}"
    return str(x)


def _tables(doc: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table, shared by the Markdown and HTML renderers."""
    out = []
    rows = []
    for t, info in doc["tenants"].items():
        acc = info["accountants"]
        rows.append(
            [
                t,
                _fmt(info["users"]),
                _fmt(info["cap"]),
                _fmt(info["epsilon_recorded"]),
                _fmt(info["epsilon_replayed"]),
                _fmt(info["max_replay_error"], 3),
                *(_fmt(acc.get(k)) for k in ACCOUNTANT_LABELS),
            ]
        )
    if rows:
        out.append(
            (
                "ε per tenant: recorded, replayed, and four accountants",
                [
                    "tenant",
                    "users",
                    "cap",
                    "ε recorded",
                    "ε replayed",
                    "max |Δ|",
                    *ACCOUNTANT_LABELS.values(),
                ],
                rows,
            )
        )
    emp = doc.get("empirical")
    if emp:
        out.append(
            (
                "empirical audit (canary attack on a replica)",
                [
                    "tenant",
                    "DP",
                    "claimed ε",
                    "ε lower bound",
                    "confidence",
                    "canaries",
                    "guesses in/out",
                    "correct",
                    "Clopper–Pearson ε (heuristic)",
                    "result",
                ],
                [
                    [
                        emp["tenant"],
                        "yes" if emp["dp"] else "no",
                        _fmt(emp["claimed_epsilon"]),
                        _fmt(emp["epsilon_lower_bound"]),
                        f"{emp['confidence']:.0%}",
                        str(emp["canaries"]),
                        f"{emp['guesses_in']}/{emp['guesses_out']}",
                        str(emp["correct"]),
                        _fmt(emp["clopper_pearson_lb"]),
                        "PASS" if emp["passed"] else "FAIL",
                    ]
                ],
            )
        )
    rel = doc.get("empirical_release")
    if rel:
        out.append(
            (
                "empirical audit of the release (canary, trials of the release function)",
                [
                    "tenant",
                    "release",
                    "noise",
                    "claimed ε (δ)",
                    "trials",
                    "ε lower bound",
                    "Gaussian-DP ε lb",
                    "Clopper–Pearson ε lb",
                    "μ fitted (lb) vs claimed",
                    "repeated releases",
                    "wall",
                    "result",
                ],
                [
                    [
                        rel["tenant"],
                        f"{rel['approach']} ({rel['mechanism']})",
                        f"{rel['noise_mode']} ({rel['shares']} share{'s' if rel['shares'] > 1 else ''})",
                        f"{_fmt(rel['claimed_epsilon'])} ({rel['delta']:g}, {rel['accountant']})",
                        str(rel["trials"]),
                        _fmt(rel["epsilon_lower_bound"]),
                        _fmt(rel["epsilon_gaussian_lb"]),
                        _fmt(rel["epsilon_clopper_pearson_lb"]),
                        f"{_fmt(rel['fitted_mu'])} ({_fmt(rel['fitted_mu_lb'])}) vs {_fmt(rel['claimed_mu'])}",
                        f"{rel['repeated_releases']}/{rel['releases_of_d_out']}",
                        f"{rel['seconds']:.1f} s",
                        "PASS" if rel["passed"] else "FAIL",
                    ]
                ],
            )
        )
    grad = doc.get("empirical_dpsgd")
    if grad:
        out.append(
            (
                "white-box DP-SGD audit (Dirac gradient canaries, one run)",
                [
                    "tenant",
                    "trainer",
                    "claimed ε (δ)",
                    "rounds × steps, q, σ",
                    "canaries (in)",
                    "ε lower bound (one run)",
                    "guesses right",
                    "noise / claimed σ·C (ub)",
                    "ε from the measured noise",
                    "canary step / C (lb)",
                    "wall",
                    "result",
                ],
                [
                    [
                        grad["tenant"],
                        grad["trainer"],
                        f"{_fmt(grad['claimed_epsilon'])} ({grad['delta']:g}, {grad['accountant']})",
                        f"{grad['rounds']} × {grad['steps_per_round']}, {grad['sample_rate']:.4g}, "
                        f"{grad['sigmas'][0]:.4g}",
                        f"{grad['canaries']} ({grad['canaries_included']})",
                        _fmt(grad["epsilon_lower_bound"]),
                        f"{grad['correct']}/{grad['guesses']}",
                        f"{grad['noise_ratio']:.4f} ({grad['noise_ratio_ub']:.4f})",
                        _fmt(grad["epsilon_from_noise"]),
                        f"{grad['contribution']:.3f} ({grad['contribution_lb']:.3f})",
                        f"{grad['seconds']:.1f} s",
                        "PASS" if grad["passed"] else "FAIL",
                    ]
                ],
            )
        )
    check_rows = []
    for c in doc["checks"]:
        if c["passed"]:
            check_rows.append([c["name"], c["tenant"] or "run", "PASS", c["note"]])
        for f in c["findings"]:
            where = ", ".join(
                x
                for x in (
                    f"line {f['line']}" if f["line"] else "",
                    f"round {f['round']}" if f["round"] else "",
                )
                if x
            )
            check_rows.append(
                [
                    c["name"],
                    c["tenant"] or "run",
                    "FAIL",
                    f"{where}: {f['message']}" if where else f["message"],
                ]
            )
    out.append(("checks", ["check", "tenant", "result", "detail"], check_rows))
    return out


def render_markdown(doc: dict[str, Any], images: list[str]) -> str:
    verdict = "PASSED — every check holds" if doc["passed"] else f"FAILED — {', '.join(doc['failed_checks'])}"
    lines = [f"# Privacy budget audit: {doc['run_dir']}", "", f"**{verdict}**", ""]
    for key in ("empirical_release", "empirical_dpsgd"):
        if doc.get(key):
            lines += [doc[key]["verdict"], ""]
    lines += ["## Scope", ""]
    lines += [f"- {s}" for s in doc["scope"]]
    for title, header, rows in _tables(doc):
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    if images:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in images]
    lines += [
        "",
        f"Tolerances: replay |Δ| ≤ {doc['tolerances']['replay_abs']:g} (same accountant); PLD vs PRV within "
        f"{doc['tolerances']['pld_vs_prv_rel']:.0%}; RDP not below PRV by more than "
        f"{doc['tolerances']['rdp_below_prv_rel']:.0%} (RDP is an upper bound).",
        f"Time: checks {doc['seconds']['checks']:.1f} s, total {doc['seconds']['total']:.1f} s. "
        + "Environment: "
        + ", ".join(f"{k} {v}" for k, v in doc["environment"].items()),
        "",
    ]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}.PASS{color:#176b1f;font-weight:600}.FAIL{color:#b00020;font-weight:700}
.verdict{font-size:1.3em;padding:.5em 1em;border-radius:6px;display:inline-block}
.ok{background:#e6f4ea}.bad{background:#fde7e9}img{max-width:100%;margin:.5em 0}
li{margin:.2em 0}
"""


def render_html(doc: dict[str, Any], images: dict[str, bytes]) -> str:
    esc = html.escape
    ok = doc["passed"]
    verdict = "PASSED — every check holds" if ok else "FAILED — " + ", ".join(doc["failed_checks"])
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>fedrec audit — {esc(doc['run_dir'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>Privacy budget audit</h1><p><code>{esc(doc['run_dir'])}</code></p>",
        f"<p class='verdict {'ok' if ok else 'bad'}'>{esc(verdict)}</p>",
        *(
            f"<p class='sentence'>{esc(doc[key]['verdict'])}</p>"
            for key in ("empirical_release", "empirical_dpsgd")
            if doc.get(key)
        ),
        "<h2>Scope</h2><ul>" + "".join(f"<li>{esc(s)}</li>" for s in doc["scope"]) + "</ul>",
    ]
    for title, header, rows in _tables(doc):
        parts.append(
            f"<h2>{esc(title)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
        )
        for row in rows:
            cells = "".join(
                f"<td class='{esc(c)}'>{esc(c)}</td>" if c in ("PASS", "FAIL") else f"<td>{esc(c)}</td>"
                for c in row
            )
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</table>")
    if images:
        parts.append("<h2>Plots</h2>")
        for name, png in images.items():
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<div><img alt='{esc(name)}' src='data:image/png;base64,{data}'></div>")
    parts.append(
        f"<p><small>Checks {doc['seconds']['checks']:.1f} s, total {doc['seconds']['total']:.1f} s. "
        + esc(", ".join(f"{k} {v}" for k, v in doc["environment"].items()))
        + "</small></p></body></html>"
    )
    return "\n".join(parts)


def write_report(outcome: AuditOutcome, run: RunFiles) -> list[Path]:
    """Write audit.json, audit.md (+ PNGs) and audit.html into ``outcome.report_dir``."""
    from fedrec.shared_model.artifacts import write_json_atomic

    out = outcome.report_dir
    out.mkdir(parents=True, exist_ok=True)
    doc = audit_json(outcome, run)
    images = _plots(outcome, run)
    files = []
    for name, png in images.items():
        (out / name).write_bytes(png)
        files.append(out / name)
    write_json_atomic(out / "audit.json", doc)
    (out / "audit.md").write_text(render_markdown(doc, list(images)), encoding="utf-8")
    (out / "audit.html").write_text(render_html(doc, images), encoding="utf-8")
    return [out / "audit.json", out / "audit.md", out / "audit.html", *files]


def audit(
    run_dir: Path,
    *,
    out: Path | None = None,
    empirical: EmpiricalConfig | None = None,
    release: ReleaseAuditConfig | None = None,
    gradient: GradientAuditConfig | None = None,
    log: Log = lambda _: None,
) -> AuditOutcome:
    """Check ``run_dir``, optionally run the canary attacks, and write the report into ``out``.

    With ``empirical`` on a DP-SGD run: the data canaries (``empirical.canaries`` > 0) and, when
    ``gradient`` is given and the run has DP, the white-box gradient canaries.
    """
    t0 = time.perf_counter()
    run = load_run(run_dir)
    report_dir = Path(out) if out is not None else Path(run_dir) / "audit"
    checks = check_run(run, log=log)
    emp = rel = grad = None
    if empirical is not None and _released(run):
        rel = release_audit(run, release or ReleaseAuditConfig(), tenant=empirical.tenant, log=log)
    elif empirical is not None:
        if empirical.canaries > 0:
            emp = empirical_audit(run, empirical, log=log)
        if gradient is not None and run.dp:
            grad = gradient_audit(run, gradient, tenant=empirical.tenant, log=log)
        elif gradient is not None:
            log("gradient canaries skipped: a run without DP has no noise to audit")
    outcome = AuditOutcome(checks, emp, report_dir, environment=_environment(), release=rel, gradient=grad)
    outcome.seconds = time.perf_counter() - t0
    outcome.files = write_report(outcome, run)
    return outcome


def _environment() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("opacus", "dp_accounting", "torch", "flwr"):
        try:
            from importlib.metadata import version

            versions[name] = version(name.replace("_", "-"))
        except Exception:  # a missing version is only not reported
            versions[name] = "?"
    try:
        import torchcsprng  # noqa: F401

        versions["torchcsprng"] = "available"
    except ImportError:
        versions["torchcsprng"] = "unavailable (secure_mode cannot be on)"
    return versions
