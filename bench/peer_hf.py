#!/usr/bin/env python3
"""Peer baseline: Hugging Face transformers' LlamaForCausalLM, generating with model.generate.

A LlamaConfig of llama-2-7b shape (hidden 4096, 32 layers, 32 heads, 32 KV heads, intermediate
11008, vocab 32000, 4096 positions) with random weights; a fixed batch of random token-id
prompts; greedy decoding that never stops early (EOS disabled, min_new_tokens = max_new_tokens),
so every sequence gets exactly --output-len new tokens.

It measures, after --warmup untimed runs, over --iters timed runs:
  * prefill:      one forward pass over the whole batch of prompts (use_cache=True), alone;
  * generate:     model.generate end to end; a stopping criterion called once per generation
                  step timestamps each step (after a device synchronize), which gives the time
                  to the first token (prefill + first sample) and the time of every decode step.
Output tokens/s = batch * output_len / generate time. The JSON has the layout of
strata-serving-bench results (benchmark / server.model_info / results) so tools/bench_report.py
shows both in one table; KV usage and preemptions do not apply and are null.

    # the baseline (GPU, fp16):
    python3 bench/peer_hf.py --batch-size 8 --input-len 512 --output-len 128 --output peer.json
    # a CPU smoke test with a tiny model:
    python3 bench/peer_hf.py --device cpu --dtype fp32 --layers 2 --hidden 256 --heads 4 \\
        --kv-heads 4 --intermediate 512 --vocab 1000 --batch-size 2 --input-len 16 --output-len 8
"""

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=8, help="sequences generated together")
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens per sequence")
    p.add_argument("--output-len", type=int, default=128, help="new tokens per sequence")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (shrink for a smoke test)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-position", type=int, default=4096)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--attn-implementation", default=None,
                   help="transformers attention backend (sdpa, eager, ...); default: its choice")
    p.add_argument("--cache-implementation", default=None,
                   help="passed to generate (e.g. static); default: the dynamic cache")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--iters", type=int, default=3, help="timed runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None, help="name of the run (default hf-DTYPE)")
    p.add_argument("--output", help="write the result JSON here")
    a = p.parse_args(argv)
    for name in ("batch_size", "input_len", "output_len", "layers", "hidden", "heads", "kv_heads",
                 "intermediate", "vocab", "max_position", "iters"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    if a.hidden % a.heads or a.heads % a.kv_heads:
        p.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    if a.input_len + a.output_len > a.max_position:
        p.error(f"--input-len + --output-len ({a.input_len + a.output_len}) exceeds "
                f"--max-position ({a.max_position})")
    if a.vocab < 4:
        p.error("--vocab must be >= 4 (ids 0-2 are reserved)")
    return a


def percentiles(values, scale=1.0):
    """mean / p50 / p90 / p99 / min / max, linear interpolation as numpy's default."""
    v = sorted(x * scale for x in values)
    if not v:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None,
                "min": None, "max": None}

    def pct(p):
        rank = p / 100 * (len(v) - 1)
        lo = int(rank)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (rank - lo)

    return {"count": len(v), "mean": statistics.fmean(v), "p50": pct(50), "p90": pct(90),
            "p99": pct(99), "min": v[0], "max": v[-1]}


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import torch
        import transformers
        from transformers import (LlamaConfig, LlamaForCausalLM, StoppingCriteria,
                                  StoppingCriteriaList)
    except ImportError as e:
        sys.exit(f"peer_hf: needs PyTorch and transformers ({e})")

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("peer_hf: --device cuda but torch sees no GPU (use --device cpu for a smoke test)")
    dtype = getattr(torch, DTYPES[a.dtype])
    torch.manual_seed(a.seed)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    cfg_kwargs = dict(
        hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads, intermediate_size=a.intermediate, vocab_size=a.vocab,
        max_position_embeddings=a.max_position, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    config = LlamaConfig(**cfg_kwargs)
    if a.attn_implementation:
        config._attn_implementation = a.attn_implementation
    # Weights are created directly on the device in the target dtype (random init; no checkpoint).
    t0 = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to(device=device, dtype=dtype).eval()
    sync()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    # Never stop early: no EOS, and min_new_tokens as a second guard.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    print(f"peer_hf: LlamaForCausalLM {params / 1e9:.2f}B params, {a.layers} layers, {a.dtype} on "
          f"{device} (built in {build_s:.1f} s); batch {a.batch_size}, {a.input_len} in / "
          f"{a.output_len} out", file=sys.stderr)

    gen = torch.Generator(device="cpu").manual_seed(a.seed)
    input_ids = torch.randint(3, a.vocab, (a.batch_size, a.input_len), generator=gen).to(device)
    attention_mask = torch.ones_like(input_ids)

    class StepClock(StoppingCriteria):
        """Called by generate after every new token: records when each step finished."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            sync()
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    gen_kwargs = dict(max_new_tokens=a.output_len, min_new_tokens=a.output_len, do_sample=False,
                      num_beams=1, eos_token_id=None, pad_token_id=0)
    if a.cache_implementation:
        gen_kwargs["cache_implementation"] = a.cache_implementation

    def prefill():
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        sync()
        return time.perf_counter() - start

    def generate():
        clock = StepClock()
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 stopping_criteria=StoppingCriteriaList([clock]), **gen_kwargs)
        sync()
        end = time.perf_counter()
        new_tokens = out.shape[1] - a.input_len
        if new_tokens != a.output_len:
            sys.exit(f"peer_hf: generate returned {new_tokens} new tokens, expected {a.output_len}")
        if len(clock.times) != a.output_len:
            sys.exit(f"peer_hf: {len(clock.times)} step callbacks for {a.output_len} tokens; "
                     "this transformers version calls stopping criteria differently")
        steps = [t1 - t0_ for t0_, t1 in zip(clock.times, clock.times[1:])]
        return {"e2e_s": end - start, "ttft_s": clock.times[0] - start, "decode_steps_s": steps}

    for _ in range(a.warmup):
        prefill()
        generate()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill_s = [prefill() for _ in range(a.iters)]
    runs = [generate() for _ in range(a.iters)]

    e2e = [r["e2e_s"] for r in runs]
    ttft = [r["ttft_s"] for r in runs]
    steps = [s for r in runs for s in r["decode_steps_s"]]
    # Per run, the mean decode step is the TPOT every sequence of the batch saw.
    tpot = [(r["e2e_s"] - r["ttft_s"]) / (a.output_len - 1) for r in runs if a.output_len > 1]
    gen_s = statistics.median(e2e)
    out_tokens = a.batch_size * a.output_len
    in_tokens = a.batch_size * a.input_len
    step_mean = statistics.fmean(steps) if steps else None
    result = {
        "command": [sys.executable] + sys.argv,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "benchmark": {
            "label": a.label or f"hf-{a.dtype}",
            "peer": "huggingface-transformers",
            "workload": "fixed",
            "num_prompts": a.batch_size,
            "request_rate": "inf",
            "concurrency": a.batch_size,
            "seed": a.seed,
            "input_len": a.input_len,
            "output_len": a.output_len,
            "warmup": a.warmup,
            "iters": a.iters,
        },
        "server": {
            "address": None,
            "model_info": {
                "model": f"LlamaForCausalLM (random weights, {a.layers} layers, hidden {a.hidden})",
                "tp_size": 1,
                "device": device.type,
                "kv_cache_dtype": a.dtype,
                "kv_scale_mode": "none",
                "max_context": a.max_position,
                "vocab_size": a.vocab,
            },
            "monitor": {"peak_kv_usage_gpu": None, "preemptions": None},
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or platform.machine()),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "cache_implementation": a.cache_implementation,
            "parameters": params,
            "peak_memory_bytes": (torch.cuda.max_memory_allocated(device)
                                  if device.type == "cuda" else None),
        },
        "config": cfg_kwargs,
        "results": {
            "num_requests": a.batch_size,
            "completed": a.batch_size,
            "failed": 0,
            "failures": {},
            "duration_s": gen_s,
            "total_input_tokens": in_tokens,
            "total_output_tokens": out_tokens,
            "request_throughput": a.batch_size / gen_s,
            "output_throughput": out_tokens / gen_s,
            "total_token_throughput": (in_tokens + out_tokens) / gen_s,
            # Every sequence of the batch sees the same times.
            "ttft_ms": percentiles(ttft, 1e3),
            "tpot_ms": percentiles(tpot, 1e3),
            "e2e_ms": percentiles(e2e, 1e3),
            "prefill_ms": percentiles(prefill_s, 1e3),
            "decode_step_ms": percentiles(steps, 1e3),
            # Tokens/s while decoding only (batch / mean step time).
            "decode_throughput": a.batch_size / step_mean if step_mean else None,
            "prefill_throughput": in_tokens / statistics.median(prefill_s),
        },
        "iterations": [{"prefill_s": p, **r} for p, r in zip(prefill_s, runs)],
    }
    res = result["results"]
    print(f"prefill {res['prefill_ms']['p50']:.1f} ms ({res['prefill_throughput']:.0f} tok/s), "
          f"TTFT {res['ttft_ms']['p50']:.1f} ms, decode step p50 "
          f"{res['decode_step_ms']['p50'] or 0:.2f} ms ({res['decode_throughput'] or 0:.0f} tok/s), "
          f"generate {gen_s:.2f} s = {res['output_throughput']:.1f} output tok/s")
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"results written to {a.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
