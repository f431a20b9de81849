#!/usr/bin/env bash
# The main job on the built-in MNIST subset, on a CPU (about 12 minutes on 2 slow AVX2 cores, the first
# time 2 more to set up .venv):
#   1. the data as webdataset shards (data/mnist5k), once;
#   2. stage 1: the VAE (configs/vae_mnist.yaml);
#   3. stage 2: the latent NDM prior on the frozen VAE, trained on the VAE's posteriors of the train images
#      encoded once (a stage-2 step then runs no encoder or decoder), then stage 3: a short end-to-end
#      fine-tuning (configs/latent_ndm_mnist.yaml);
#   4. a bits/dim report of every stage on the same 500 test images (runs/quickstart/bpd.json);
#   5. 256 samples from the final model, scored by the project's MNIST classifier (trained once into
#      runs/mnist_classifier): the share it reads with probability >= 0.9 beside the real test images'
#      share, the entropy of its predicted classes, FD-MNIST (runs/quickstart/quality.json); the grid
#      runs/quickstart/samples/*.png shows the same samples. They are drawn at temperature 0.8 (z_1 ~
#      N(0, 0.8^2 I), deterministic sampler, 25 steps) and autoguided by stage 2's checkpoint at a quarter of
#      its steps (weight 2): cleaner digits than either alone gives the same model (docs/RESULTS.md).
#   scripts/quickstart.sh [VAE_STEPS [PRIOR_STEPS [JOINT_STEPS]]]     (default 500 800 100)
source "$(dirname "$0")/_env.sh"
set -euo pipefail
VAE_STEPS="${1:-500}"
PRIOR_STEPS="${2:-800}"
JOINT_STEPS="${3:-100}"
SAMPLER=deterministic
SAMPLE_STEPS=25  # guided: as legible as 50 steps, and cheaper than 50 unguided ones (docs/RESULTS.md, section 12)
TEMPERATURE=0.8
GUIDANCE=2
OUT=runs/quickstart
SHARDS=data/mnist5k
# Stages 2 and 3 write no sample grids of their own (about 40 s here): the samples are step 5's, scored.
# Every run starts afresh: a previous result (perhaps of other settings, which a resume would refuse) is kept
# beside it, not overwritten.
if [ -e "$OUT" ]; then
  rm -rf "$OUT.previous" && mv "$OUT" "$OUT.previous" && echo "moved the previous $OUT to $OUT.previous" >&2
fi
mkdir -p "$OUT"
start=$(date +%s)
# The training data are read as webdataset shards, like any user data: write them once.
[ -f "$SHARDS/manifest.json" ] || python -m latent_ndm.data.writer mnist5k "$SHARDS" >/dev/null
common=(out_dir="$OUT" data.shards="$SHARDS" train.eval_every=0)
python -m latent_ndm.cli train_vae configs/vae_mnist.yaml name=vae "${common[@]}" train.steps="$VAE_STEPS" \
  train.sample_every="$VAE_STEPS" train.ckpt_every="$VAE_STEPS" >/dev/null
python -m latent_ndm.cli encode_latents "$OUT/vae/vae" "$SHARDS" "$OUT/latents" >/dev/null
# Stage 2 keeps its checkpoint at a quarter of its steps: the weaker model that guides the samples.
GUIDE_STEP=$(( PRIOR_STEPS / 4 > 0 ? PRIOR_STEPS / 4 : 1 ))
python -m latent_ndm.cli train_latent configs/latent_ndm_mnist.yaml name=latent_ndm vae_path="$OUT/vae/vae" \
  latents="$OUT/latents" "${common[@]}" train.steps="$PRIOR_STEPS" train.ckpt_every="$GUIDE_STEP" \
  train.keep_checkpoints=5 train.sample_every=0 --stages prior,joint --joint-steps "$JOINT_STEPS" >/dev/null
CLASSIFIER=runs/mnist_classifier
[ -f "$CLASSIFIER/model.safetensors" ] || python -m latent_ndm.cli train_classifier --shards "$SHARDS" \
  --out "$CLASSIFIER" >/dev/null
python -m latent_ndm.cli evaluate "$OUT/latent_ndm_joint" --metrics fd_mnist --classifier "$CLASSIFIER" \
  --num-samples 256 --sampler "$SAMPLER" --sample-steps "$SAMPLE_STEPS" --temperature "$TEMPERATURE" --seed 0 \
  --guide "$OUT/latent_ndm/checkpoints/step_$(printf %08d "$GUIDE_STEP")" --guidance "$GUIDANCE" \
  --save-samples "$OUT/samples" \
  --out "$OUT/quality.json" >/dev/null
python - "$OUT" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
out, seconds = sys.argv[1], int(sys.argv[2])
read = lambda run: json.load(open(f"{out}/{run}/test_report.json"))
report = {
    "vae (stage 1, N(0, I) prior)": read("vae"),
    "latent NDM (stage 2)": read("latent_ndm")["nelbo"],
    "latent NDM (stage 3, end to end)": read("latent_ndm_joint")["nelbo"],
    "wall_seconds": seconds,
}
json.dump(report, open(f"{out}/bpd.json", "w"), indent=2)
print(f"\ntest NELBO of the whole model, bits/dim (MNIST subset, {report['vae (stage 1, N(0, I) prior)']['num_images']} test images):")
for key, r in report.items():
    if key != "wall_seconds":
        print(f"  {key:<34} {r['bpd']:.3f} +- {r['bpd_stderr']:.3f}")
quality = json.load(open(f"{out}/quality.json"))["sample_quality"]
real = quality["reference"]["test_legibility"]
for steps, q in quality["steps"].items():
    leg = q["legibility"]
    guided = f", autoguided with weight {quality['guidance']:g}" if quality.get("guidance") is not None else ""
    print(f"\n{quality['num_samples']} samples ({quality['sampler']}, {steps} steps, temperature "
          f"{quality['temperature']:g}{guided}), scored by the MNIST classifier:")
    print(f"  read with probability >= {leg['threshold']}: {leg['legible_share']:.1%} of the samples, "
          f"{real['legible_share']:.1%} of the real test images")
    print(f"  entropy of the predicted classes: {leg['class_entropy_bits']:.2f} bits (uniform over 10 digits: 3.32)")
    print(f"  FD-MNIST: {q['fd_mnist']:.1f} (train vs test images: {quality['reference']['fd_mnist_train_vs_test']:.1f})")
print(f"samples: {out}/samples/   reports: {out}/bpd.json, {out}/quality.json   ({seconds} s)")
PY
