"""fedrec — a privacy-preserving federated recommender (Flower + Opacus, user-level DP).

One namespace, five parts, each a top-level folder of the repository mapped here at install time
(``[tool.setuptools.package-dir]`` in pyproject.toml):

- ``fedrec.shared_model`` — the model, its weight codec, ranking and metrics (imports nothing of ours);
- ``fedrec.privacy`` — anonymization, encryption, DP accounting, the budget ledger, audits;
- ``fedrec.client`` — the Flower ClientApp: a tenant's vault, local DP training and evaluation;
- ``fedrec.server`` — the Flower ServerApp: strategy, SecAgg+, checkpoints, the serving API;
- ``fedrec.simulations`` — data, the run driver, the CLI, the deployment kit, reports, benchmarks.
"""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("fedrec")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def _source_tree() -> Path | None:
    """The checkout this folder sits in, when it is one (not an installed wheel).

    In a wheel the parts are sub-folders of this package. In the repository — and in the Flower app
    bundle (FAB) that ``flwr run .`` / ``fedrec deploy launch`` builds from it, which a SuperNode puts
    first on ``sys.path`` — they are this folder's siblings, so ``fedrec.server`` is found there.
    """
    here = Path(__file__).resolve().parent
    root = here.parent
    if (here / "server").is_dir() or not (root / "pyproject.toml").is_file():
        return None
    parts = ("server", "client", "privacy", "shared_model", "simulations")
    return root if all((root / p / "__init__.py").is_file() for p in parts) else None


_root = _source_tree()
if _root is not None:
    __path__.append(str(_root))  # a package may extend its own search path
