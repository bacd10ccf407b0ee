#!/usr/bin/env bash
# The installed package, not the repository: build the wheel, install it (not editable) into a fresh venv,
# and from an empty temp dir (no repo on sys.path) check that the wheel holds `fedrec/` and nothing else
# of ours at top level, that `fedrec --help` works, that `import server` fails, and that a 2-tenant,
# 1-round synthetic DP simulation runs from it. A missing package-data file or a stray import of a
# top-level `server` fails here. Run by `make test` (so by CI); `make wheel-check` runs it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-python3}
WORK=$(mktemp -d /tmp/fedrec-wheel.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_HOME="$WORK/flwr-home"

echo "wheel-check: building the wheel"
"$REPO/.venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$REPO" 2>&1 | grep -v '^WARNING: Location' || true
WHEEL=$(ls "$WORK"/dist/fedrec-*.whl)
TOP=$("$PY" -c "import sys, zipfile; print(' '.join(sorted({n.split('/')[0] for n in zipfile.ZipFile(sys.argv[1]).namelist() if not n.split('/')[0].endswith('.dist-info')})))" "$WHEEL")
echo "wheel-check: $(basename "$WHEEL") top level: $TOP"
[ "$TOP" = "fedrec" ] || { echo "wheel-check: FAILED: the wheel's top level must be 'fedrec' only, got: $TOP"; exit 1; }

echo "wheel-check: installing it into a fresh venv"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q -c "$REPO/constraints.txt" "$WHEEL" 2>&1 | grep -v '^WARNING: Location' || true
cd "$WORK"   # no repository on sys.path from here on
V="$WORK/venv/bin"
"$V/python" - <<'PY'
import importlib.util, sys
import fedrec, fedrec.server.app, fedrec.client.app, fedrec.simulations.cli.main
assert "site-packages" in fedrec.__file__, fedrec.__file__
for bare in ("server", "client", "privacy", "shared_model", "simulations"):
    assert importlib.util.find_spec(bare) is None, f"a top-level '{bare}' is importable: {importlib.util.find_spec(bare).origin}"
print(f"wheel-check: fedrec {fedrec.__version__} imports from {fedrec.__file__}; no top-level server/client/privacy/shared_model/simulations")
PY
"$V/fedrec" --help > "$WORK/help.txt"
grep -q "simulate" "$WORK/help.txt"
"$V/python" -m fedrec --help > /dev/null
echo "wheel-check: fedrec --help and python -m fedrec --help work"
"$V/fedrec" simulate --data synthetic --synth-users 300 --synth-items 200 --tenants 2 --rounds 1 \
    --approach mlp --epsilon 8 --out "$WORK/run" > "$WORK/simulate.log" 2>&1 || { cat "$WORK/simulate.log"; echo "wheel-check: FAILED: simulate from the wheel"; exit 1; }
for f in metrics.json model.pt model.json privacy.json rounds.jsonl; do
    [ -f "$WORK/run/$f" ] || { cat "$WORK/simulate.log"; echo "wheel-check: FAILED: $f missing"; exit 1; }
done
"$V/fedrec" recommend --model "$WORK/run" --history 1,2,3 -k 5 > /dev/null
echo "wheel-check: a 2-tenant, 1-round synthetic DP simulation and a top-5 ran from the installed wheel: OK"
