#!/usr/bin/env bash
# The training step bench on a GPU host that has Python with torch 2.11 (CUDA) but no Rust
# toolchain. Build the bench binary on a machine with the toolchain and carry it over:
#
#   cargo bench --no-run    # prints the binary: target/release/deps/train_step-<hash>
#   benches/gpu.sh target/release/deps/train_step-<hash>
#
# Run from the repository root (models/smollm2-135m-instruct and the HH-RLHF file must be
# there; REBELD_BENCH_HH overrides the HH-RLHF path, relative to the root). It trains in bf16
# on cuda:0, rebeld alone (no PyTorch/TRL baselines), for SmolLM2-135M and for a randomly
# initialized ~1.2B model of the same family (SmolLM2-1.7B's widths, 16 layers), and prints
# tokens/s, MFU = 6·N·tokens/s over the device's dense bf16 peak, and the peak device memory
# nvidia-smi saw (which includes the caching allocator's reserve).
#
# PEAK_TFLOPS overrides the peak (dense bf16 TFLOP/s) when the GPU is not in the table below.
set -euo pipefail

binary=${1:?usage: benches/gpu.sh TRAIN_STEP_BENCH_BINARY}
root=$(pwd)
work=$(mktemp -d)
trap 'kill "${sampler:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

torch_lib=$(python -c 'import os, torch; print(os.path.dirname(torch.__file__) + "/lib")')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)
if [[ -z "${PEAK_TFLOPS:-}" ]]; then
    case "$gpu" in
        *H200* | *H100*) PEAK_TFLOPS=989 ;;
        *A100*) PEAK_TFLOPS=312 ;;
        *L40S*) PEAK_TFLOPS=362 ;;
        *L4*) PEAK_TFLOPS=121 ;;
        *) echo "unknown GPU '$gpu': set PEAK_TFLOPS" >&2; exit 2 ;;
    esac
fi

# A ~1.2B model of the SmolLM2 family with random weights (normal, std 0.02; norms at 1),
# written as bf16 safetensors by torch alone, with SmolLM2-135M's tokenizer files.
random_model() {
    local dir=$1
    mkdir -p "$dir"
    local from=models/smollm2-135m-instruct
    cp "$from/tokenizer.json" "$from/tokenizer_config.json" "$dir/"
    python - "$dir" <<'EOF'
import json, struct, sys
import torch

out = sys.argv[1]
base = json.load(open("models/smollm2-135m-instruct/config.json"))
config = dict(base, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
              num_attention_heads=32, num_key_value_heads=32, head_dim=64, dtype="bfloat16")
config.pop("torch_dtype", None)
json.dump(config, open(f"{out}/config.json", "w"), indent=2)
h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
kv = config["num_key_value_heads"] * config["head_dim"]
shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h]}
for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({
        p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
        p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
        p + "mlp.gate_proj.weight": [f, h], p + "mlp.up_proj.weight": [f, h],
        p + "mlp.down_proj.weight": [h, f],
        p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
    })
if not config.get("tie_word_embeddings", False):
    shapes["lm_head.weight"] = [v, h]
header, blobs, offset = {}, [], 0
gen = torch.Generator().manual_seed(0)
for name, shape in shapes.items():
    t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
    raw = t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes()
    header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
meta = json.dumps(header).encode()
meta += b" " * (-len(meta) % 8)
with open(f"{out}/model.safetensors", "wb") as fh:
    fh.write(struct.pack("<Q", len(meta)))
    fh.write(meta)
    for raw in blobs:
        fh.write(raw)
print(sum(torch.Size(s).numel() for s in shapes.values()))
EOF
}

# Parameters of a safetensors file: the sum of its tensors' elements.
parameters() {
    python - "$1" <<'EOF'
import json, math, struct, sys
with open(sys.argv[1], "rb") as fh:
    (n,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(n))
print(sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__"))
EOF
}

run() {
    local name=$1 dir=$2 pairs=$3
    local params log mem
    params=$(parameters "$dir/model.safetensors")
    log="$work/$name.log"
    mem="$work/$name.mem"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$mem" &
    sampler=$!
    REBELD_BENCH_ROOT="$root" REBELD_BENCH_DEVICE=cuda REBELD_BENCH_BF16=1 \
        REBELD_BENCH_BASELINES=0 REBELD_BENCH_STEPS="${STEPS:-10}" \
        REBELD_BENCH_PROMPT_TOKENS=256 REBELD_BENCH_RESPONSE_TOKENS=128 \
        REBELD_BENCH_MODELS="$name=$dir:$pairs" "$binary" | tee "$log"
    kill "$sampler"
    wait "$sampler" 2>/dev/null || true
    local tps peak_mib
    tps=$(awk -F'|' '/rebeld chi2-REBEL/ { gsub(/ /, "", $6); print $6 }' "$log")
    peak_mib=$(sort -n "$mem" | tail -n1)
    python - "$name" "$params" "$tps" "$PEAK_TFLOPS" "$peak_mib" >>"$work/rows" <<'EOF'
import sys
name, n, tps, peak, mib = sys.argv[1:]
n, tps, peak = int(n), float(tps), float(peak)
mfu = 6 * n * tps / (peak * 1e12)
print(f"| {name} | {n / 1e6:.0f}M | {tps:.0f} | {mfu * 100:.1f}% | {mib} MiB |")
EOF
}

torch_version=$(python -c 'import torch; print(torch.__version__)')
echo "GPU: $gpu (bf16 peak $PEAK_TFLOPS TFLOP/s); torch $torch_version"
random_model "$work/random-1b" >/dev/null
run smollm2-135m models/smollm2-135m-instruct 16
run random-1b "$work/random-1b" 8
echo
echo "| model | parameters | tokens/s | MFU (6·N·tokens/s) | peak memory |"
echo "| --- | ---: | ---: | ---: | ---: |"
cat "$work/rows"
