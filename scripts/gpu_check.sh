#!/usr/bin/env bash
# One short, prepared GPU check (issue 16 item 4) for a machine lent a GPU; about 3–5 minutes.
#
#   bash scripts/gpu_check.sh            # from the repository root, after `make install`
#   OUT=/some/dir bash scripts/gpu_check.sh
#   REQUIRE_GPU=1 bash scripts/gpu_check.sh   # exit 1 when torch sees no CUDA GPU
#
# 1. what torch sees (version, CUDA build, devices);
# 2. the DP-step benchmark (`fedrec bench dp-step`: plain vs fedrec's DP step, 1 682 and 20 000 items) on
#    cpu and, when a GPU is visible, on cuda — same sizes, same batch;
# 3. a 3-tenant DP simulation of the MLP (`fedrec simulate --approach mlp`) on synthetic data, where each
#    virtual SuperNode gets its share of the GPUs (simulations/driver/simulate.py:gpu_fraction) and each
#    tenant trains on cuda when torch sees it (client/task.py:local_config);
# then one table. Nothing here needs the network; the JSON files stay in $OUT.
# Without a GPU the script still runs the CPU rows and says so (tests never need a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_HOME=${FLWR_HOME:-$(mktemp -d)}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
fedrec() { "$PY" -m fedrec "$@"; }

echo "== 1. torch and CUDA"
"$PY" - <<'EOF' | tee "$OUT/torch.txt"
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
      f"CUDA visible: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB")
EOF
GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
if [ "$GPU" != 1 ]; then
  echo "CUDA is not visible to torch: only the CPU rows run."
  if [ "${REQUIRE_GPU:-0}" = 1 ]; then exit 1; fi
fi

echo "== 2. DP step, cpu$([ "$GPU" = 1 ] && echo ' and cuda')"
DEVICES=cpu
[ "$GPU" = 1 ] && DEVICES="cpu cuda"
for d in $DEVICES; do
  fedrec bench dp-step --device "$d" --sizes 1682,20000 --modes plain,fast --repeats 15 --no-memory \
    --json "$OUT/dp_step_$d.json"
done

echo "== 3. 3-tenant DP simulation of the MLP ($([ "$GPU" = 1 ] && echo 'GPU share per virtual node' || echo 'cpu'))"
t0=$(date +%s)
fedrec simulate --data synthetic --tenants 3 --synth-users 3000 --synth-items 1000 --approach mlp \
  --epsilon 8 --rounds 3 --out "$OUT/sim" --overwrite
echo "$(( $(date +%s) - t0 ))" > "$OUT/sim_seconds.txt"

echo "== summary"
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print((out / "torch.txt").read_text().splitlines()[0])
runs = {p.stem.removeprefix("dp_step_"): json.loads(p.read_text()) for p in sorted(out.glob("dp_step_*.json"))}
print(f"{'items':>7} {'device':<28} {'plain ms':>9} {'DP ms':>8} {'DP/plain':>9} {'DP vs cpu':>10}")
for size in runs["cpu"]["sizes"]:
    cpu_dp = runs["cpu"]["sizes"][size]["dp_ms"]
    for dev, r in runs.items():
        row = r["sizes"][size]
        print(f"{size:>7} {r['device_name'][:28]:<28} {row['plain_ms']:>9.2f} {row['dp_ms']:>8.2f} "
              f"{row['ratio']:>9.2f} {cpu_dp / row['dp_ms']:>9.2f}×")
m = json.loads((out / "sim" / "metrics.json").read_text())
p = json.loads((out / "sim" / "privacy.json").read_text())
secs = (out / "sim_seconds.txt").read_text().strip()
print(f"simulation: 3 tenants, {secs} s wall, full HR@10 {m['full']['hr@10']:.4f}, "
      f"DP popularity {m['baselines']['dp_popularity']['full']['hr@10']:.4f}")
for t, e in sorted(p["tenants"].items()):
    print(f"  {t}: ε {e['epsilon']:.3f} of {e['cap']:g} (δ {p['delta']:g}, unit {p['unit']}, "
          f"accountant {p['accountant']}, {e['rounds_trained']} rounds trained)")
EOF
echo "files: $OUT"
