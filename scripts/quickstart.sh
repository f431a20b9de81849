#!/usr/bin/env bash
# The main job on the built-in MNIST subset, on a CPU: train a pixel-space NDM and its F = identity
# baseline with the same budget, then write a sample grid and a bits/dim report.
#   scripts/quickstart.sh [STEPS]     (default 500 steps each; about 12 minutes on 2 cores)
source "$(dirname "$0")/_env.sh"
STEPS="${1:-500}"
OUT=runs/quickstart
SHARDS=data/mnist5k
mkdir -p "$OUT"
common=(out_dir="$OUT" data.shards="$SHARDS" train.steps="$STEPS" train.eval_every=0 train.sample_every="$STEPS"
        train.ckpt_every=250)
start=$(date +%s)
# The training data are read as webdataset shards, like any user data: write them once.
[ -f "$SHARDS/manifest.json" ] || python -m latent_ndm.shards mnist5k "$SHARDS" >/dev/null
python -m latent_ndm.cli train configs/ndm_mnist.yaml name=ndm "${common[@]}"
python -m latent_ndm.cli train configs/ddpm_mnist.yaml name=ddpm "${common[@]}"
for run in ndm ddpm; do
  python -m latent_ndm.cli evaluate "$OUT/$run" --steps 10,100,1000,continuous --out "$OUT/bpd_$run.json" >/dev/null
  cp "$(ls "$OUT/$run"/samples/*.png | tail -1)" "$OUT/samples_$run.png"
done
python - "$OUT" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
out, seconds = sys.argv[1], int(sys.argv[2])
report = {run: json.load(open(f"{out}/bpd_{run}.json"))["nelbo"] for run in ("ndm", "ddpm")}
report["wall_seconds"] = seconds
json.dump(report, open(f"{out}/bpd.json", "w"), indent=2)
print(f"\ntest NELBO, bits/dim (MNIST subset, 500 test images), after the same number of steps:")
for key in ("continuous", "T=1000", "T=100", "T=10"):
    print(f"  {key:>10}:  NDM {report['ndm'][key]['bpd']:.3f}   baseline {report['ddpm'][key]['bpd']:.3f}")
print(f"samples: {out}/samples_ndm.png, {out}/samples_ddpm.png   report: {out}/bpd.json   ({seconds} s)")
PY
