#!/usr/bin/env bash
# The GPU measurements of cohort training in one run (benchmarks/RESULTS.md "Cohort training", GPU part), for a
# machine with a CUDA build of torch and transformers. About 13-15 minutes on one H200 for all parts.
#
#   python benchmarks/cohort.py shapes --out SHAPES     # first, on any machine with the package installed
#   benchmarks/gpu.sh OUT_DIR SHAPES [BUNDLE_DIR]       # then, on the GPU machine
#   PARTS="step costs" benchmarks/gpu.sh ...            # only some parts (default: step costs peer fed scale dp),
#                                                       # e.g. to split the run over two commands of <= 10 minutes
#
# SHAPES: the config-only model directories (MiniLM-L6, BERT-base, ViT-B/16, a tiny BERT, with tokenizer / image
# processor files; under 2 MB) that `cohort.py shapes` writes.
# BUNDLE_DIR (optional): a folder whose install.sh installs Ray and the pure-Python packages the machine lacks into
# /tmp/site, for a machine without network access; without it, Ray must already be importable.
# No weights are downloaded: BERT-base and ViT-B/16 are built from their configs with random weights (speed and
# memory do not depend on the weights), and the federation runs on Banking77, which the package ships.
#
#   1. cuda.txt      the device, torch and CUDA versions
#   2. step.csv/md   client-steps/s and peak memory vs cohort size 1/3/8/32/100, MiniLM-L6, BERT-base and ViT-B/16
#                    (and a tiny BERT as the launch-bound extreme), fp32 and bf16, Ravan and FedIT (Ray-free, one
#                    ModelHost)                                                                     [part step]
#   3. costs.csv/md  from step.csv: the paper's CIFAR-100 setup (ViT-B/16, 50 rounds x 3 clients x 50 steps of 32)
#                    in device-minutes one by one and as cohorts, and the two goals (3-client ViT-B/16 round <= 1/2,
#                    32-client MiniLM round <= 1/5 of one by one)                                   [part costs]
#   4. peer.csv/md   the peer workload (FedIT and Ravan, a MiniLM-L6 shape, Banking77, 3 clients a round x 10 steps
#                    of 32, 4 rounds) through Ray on the GPU: three 1/3-GPU actors one by one against one whole-GPU
#                    actor training the 3 as one cohort                                             [part peer]
#   5. fed.csv       the Ray-orchestrated federation on the GPU: 8 clients a round x 10 local steps of 32 on BERT-base
#                    in bf16, four actors of 0.25 GPU each one by one, against one actor of the whole GPU training
#                    the round as one cohort                                                        [part fed]
#   6. scale.csv/md  1,000 MiniLM-shaped clients in bf16, 100 a round, on four 0.25-GPU actors: one by one against
#                    each actor's 25 clients as one cohort                                          [part scale]
#   7. dp.txt        one round of DP-SGD (privacy.mode=sample) on the GPU: the noise generator on the model's device
#                                                                                                   [part dp]
set -uo pipefail
out=${1:?usage: benchmarks/gpu.sh OUT_DIR SHAPES [BUNDLE_DIR]}
shapes=$(cd "${2:?usage: benchmarks/gpu.sh OUT_DIR SHAPES [BUNDLE_DIR]}" && pwd)
bundle=${3:-}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
cd "$here"
if [ -n "$bundle" ]; then  # once per machine: a second call (another PARTS) finds it installed
  { [ -d /tmp/site/ray ] || bash "$bundle/install.sh" /tmp/site >/dev/null; } && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
parts=" ${PARTS:-step costs peer fed scale dp} "
want() { [[ "$parts" == *" $1 "* ]]; }

"$py" - >"$out/cuda.txt" 2>&1 <<'PY'
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
print(torch.cuda.get_device_name(0), round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), "GiB")
PY
cat "$out/cuda.txt"

if want step; then
  echo "== step: cohort size vs client-steps/s"
  timeout 360 "$py" benchmarks/cohort.py step --shapes "$shapes" --models \
    --dtypes float32 bfloat16 --sizes 1 3 8 32 100 --steps 5 --out "$out" 2>&1 | grep -v Warning | tail -90
fi
if want costs; then
  echo "== costs: the CIFAR-100 run and the goals, from step.csv"
  "$py" benchmarks/cohort.py costs --out "$out" 2>&1 | tail -20
fi

common=(--set model.name="$shapes/bert-base" --set model.dtype=bfloat16 --set model.dropout=0
        --set federation.rounds=3 --set federation.clients_per_round=8 --set federation.local_steps=10
        --set federation.batch_size=32 --set federation.eval_every=3 --set data.max_test_samples=512
        --set resources.num_gpus=1 --set resources.server_cpus=0 --set output.checkpoint_every=1000)
run() {  # label, extra --set arguments
  local label=$1; shift
  timeout 200 "$py" -m ravan_ray.cli run --quiet --output "$out/runs/$label" "${common[@]}" "$@" \
    >"$out/runs-$label.log" 2>&1 || { echo "$label failed:"; tail -5 "$out/runs-$label.log"; return; }
  "$py" -c "import pandas as p, sys; m = p.read_csv(sys.argv[1]); print(sys.argv[2] + ',' + ';'.join(f'{s:.2f}' for s in m.round_s))" \
    "$out/runs/$label/metrics.csv" "$label" | tee -a "$out/fed.csv"
}
mkdir -p "$out/runs"
if want peer; then
  echo "== the peer workload on the GPU: three 1/3-GPU actors one by one vs one cohort of 3"
  timeout 400 "$py" benchmarks/cohort.py peer --gpu --rounds 4 --out "$out" --set model.name="$shapes/minilm-l6" \
    --set resources.num_gpus=1 --set resources.server_cpus=0 2>&1 | grep -v Warning | tail -8
fi
if want fed; then
  echo "== federation on the GPU: fractional actors one by one vs one cohort"
  echo "setting,round_s" >"$out/fed.csv"
  run quarter-gpu-actors --set resources.gpus_per_client=0.25 --set resources.cpus_per_client=2 --set resources.pool_size=4
  run one-cohort --set resources.gpus_per_client=1 --set resources.cpus_per_client=8 --set resources.pool_size=1 \
    --set resources.cohort_size=auto
fi

if want scale; then
  echo "== 1,000 MiniLM-shaped clients, 100 a round, four 0.25-GPU actors: one by one vs cohorts"
  timeout 300 "$py" benchmarks/cohort.py scale --out "$out" --rounds 3 --cohort-size auto \
    --set federation.num_clients=1000 --set model.name="$shapes/minilm-l6" --set model.dtype=bfloat16 --set data.max_length=64 \
    --set federation.local_steps=10 --set federation.batch_size=8 --set resources.num_gpus=1 \
    --set resources.gpus_per_client=0.25 --set resources.cpus_per_client=2 --set resources.pool_size=4 \
    --set resources.server_cpus=0 2>&1 | grep -v Warning | tail -12
fi

want dp || exit 0
echo "== DP-SGD on the GPU"
timeout 120 "$py" -m ravan_ray.cli run --quiet --output "$out/runs/dp-sgd" --set model.name="$shapes/tiny-bert" \
  --set federation.rounds=1 --set federation.local_steps=2 --set privacy.mode=sample \
  --set privacy.noise_multiplier=1.0 --set privacy.clip_norm=1.0 --set resources.gpus_per_client=1 \
  --set resources.num_gpus=1 --set resources.pool_size=1 >"$out/dp.txt" 2>&1 && echo "DP-SGD on cuda: ok" | tee -a "$out/dp.txt" \
  || { echo "DP-SGD on cuda failed:"; tail -5 "$out/dp.txt"; }
