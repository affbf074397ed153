#!/usr/bin/env python3
"""Peer baseline: FlashInfer's batch paged decode on the shapes of bench/decode_attention_bench.cu.

Shape, as in that benchmark: batch 64, 32 query heads, 8 KV heads, head_dim 128, page (block)
size 16, contexts 512 / 4096 / 32768, every sequence at the full context. FlashInfer side:
BatchDecodeWithPagedKVCacheWrapper, NHD layout, fp16 queries and output, KV cache in fp16,
fp8 e4m3 or fp8 e5m2 (per-tensor k_scale = v_scale = 1.0), planned once per cache copy, then run().

Method, as in the C++ benchmark: random K/V pages and queries; enough cache copies (each a random
page permutation with its own planned wrapper) rotated call by call that the bytes touched exceed
4x L2 (at most 16 copies); CUDA events around each run(), median after a warm-up; achieved
bandwidth = (K/V bytes read + output bytes written) / time, against the device-to-device copy
bandwidth (read + write) of a 2 GiB torch copy measured in the same run. Differences: FlashInfer's
fp8 scales are per tensor, so no scale bytes are counted, and its output is fp16 (Strata writes
fp32: 0.5 MB more per step, under 1% of the bytes at context 512). run() is Python and costs tens of
microseconds of host time per call, so each group of timed calls is queued behind a
torch.cuda._sleep and the events bracket back-to-back GPU work only (the C++ numbers also include
a few microseconds of launch latency); the host time per run() call is reported on its own.

On the GPU machine (no network), after tools/flashinfer_pack.sh made .peer/flashinfer.tar.xz:
    mkdir -p /tmp/fi && tar xJf .peer/flashinfer.tar.xz -C /tmp/fi
    python3 bench/peer_flashinfer.py --fi-root /tmp/fi --check --json /tmp/peer_flashinfer.json
The first plan() of each KV dtype JIT-compiles FlashInfer's decode module with nvcc into
$FLASHINFER_WORKSPACE_BASE/.cache/flashinfer (default base here: /tmp/flashinfer_ws); the seconds
spent are printed.
"""

import argparse, json, math, os, platform, shutil, statistics, subprocess, sys, time, traceback

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
DEVICE = "cuda"
KV_DTYPES = {"fp16": "float16", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--contexts", default="512,4096,32768", help="comma-separated context lengths")
    p.add_argument("--kv-dtypes", default="fp16,fp8_e4m3,fp8_e5m2", help="of: " + ",".join(KV_DTYPES))
    p.add_argument("--iters", type=int, default=0, help="timed calls per case (0: 100, 30 at >= 32768)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per case")
    p.add_argument("--copy-iters", type=int, default=10, help="timed 2 GiB copies")
    p.add_argument("--backend", default="fa2", help="wrapper backend (fa2: the CUDA-core decode kernel; auto)")
    p.add_argument("--use-tensor-cores", action="store_true", help="decode through the prefill kernels")
    p.add_argument("--check", action="store_true", help="compare with a torch reference on a small shape first")
    p.add_argument("--fi-root", default=os.environ.get("FLASHINFER_PEER_ROOT"),
                   help="unpacked .peer/flashinfer.tar.xz (site/, fallback/, bin/)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    a.contexts = [int(c) for c in a.contexts.split(",") if c]
    a.kv_dtypes = [d for d in a.kv_dtypes.split(",") if d]
    bad = [d for d in a.kv_dtypes if d not in KV_DTYPES]
    if bad:
        p.error(f"unknown kv dtype(s) {bad}; choose from {list(KV_DTYPES)}")
    return a


def prepare_environment(fi_root):
    """Bundle paths (site first, fallback last, bin on PATH), JIT cache under /tmp, CUDA_HOME."""
    if fi_root:
        site, fallback, bindir = (os.path.join(fi_root, d) for d in ("site", "fallback", "bin"))
        if not os.path.isdir(site):
            sys.exit(f"--fi-root {fi_root}: no site/ (unpack .peer/flashinfer.tar.xz there)")
        sys.path.insert(0, site)
        sys.path.append(fallback)
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            x for x in (site, os.environ.get("PYTHONPATH"), fallback) if x)
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", "/tmp/flashinfer_ws")
    os.environ.setdefault("TVM_FFI_CACHE_DIR", "/tmp/tvm_ffi_cache")
    if not shutil.which("nvcc") and "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    if not shutil.which("ninja"):
        print("warning: no `ninja` on PATH; FlashInfer's JIT build needs it (use --fi-root)", file=sys.stderr)


def nvcc_version():
    nvcc = os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc") if os.environ.get("CUDA_HOME") else "nvcc"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        return out.strip().splitlines()[-1] if out.strip() else None
    except OSError:
        return None


def event_pair(torch):
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def copy_bandwidth(torch, iters):
    """D2D copy of 2 GiB, alternating direction; (read + write) bytes / median time, GB/s."""
    n = 2 << 30
    a = torch.ones(n, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    ms = []
    for i in range(iters):
        e0, e1 = event_pair(torch)
        e0.record()
        (a if i % 2 else b).copy_(b if i % 2 else a)
        e1.record()
        e1.synchronize()
        ms.append(e0.elapsed_time(e1))
    del a, b
    torch.cuda.empty_cache()
    return 2.0 * n / (statistics.median(ms) * 1e-3) / 1e9


def sleep_cycles_per_us(torch):
    if not hasattr(torch.cuda, "_sleep"):
        return None
    torch.cuda._sleep(1000)
    e0, e1 = event_pair(torch)
    e0.record()
    torch.cuda._sleep(20_000_000)
    e1.record()
    e1.synchronize()
    return 20_000_000 / (e0.elapsed_time(e1) * 1e3)


def time_calls(torch, calls, iters, warmup, cyc_per_us, group=10):
    """Median GPU time (us) of one call (calls rotate), host us per call, and whether run() blocked."""
    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    ms, host_s, blocked, done, sleep_us = [], 0.0, False, 0, 50_000.0
    while done < iters:
        n = min(group, iters - done)
        ev = [event_pair(torch) for _ in range(n)]
        if cyc_per_us:
            torch.cuda._sleep(int(sleep_us * cyc_per_us))  # GPU busy while the host queues the group
        t0 = time.perf_counter()
        for j, (e0, e1) in enumerate(ev):
            e0.record()
            calls[(warmup + done + j) % len(calls)]()
            e1.record()
            if not cyc_per_us:
                e1.synchronize()
        t = time.perf_counter() - t0
        torch.cuda.synchronize()
        host_s += t
        blocked |= bool(cyc_per_us) and t * 1e6 >= sleep_us
        sleep_us = max(1000.0, 3e6 * t)
        ms += [e0.elapsed_time(e1) for e0, e1 in ev]
        done += n
    return statistics.median(ms) * 1e3, host_s / iters * 1e6, blocked


def make_cache(torch, kv_dtype, batch, ctx, copies, gen):
    """K and V page pools ([pages, PAGE, KV_HEADS, HEAD_DIM], NHD) for `copies` caches, plus
    a random page permutation (int32 indices) per copy."""
    per_seq = -(-ctx // PAGE)
    pages_one = batch * per_seq
    shape = (pages_one * copies, PAGE, KV_HEADS, HEAD_DIM)
    k = torch.empty(shape, dtype=kv_dtype, device=DEVICE)
    v = torch.empty(shape, dtype=kv_dtype, device=DEVICE)
    chunk = 16384
    for pool in (k, v):
        for s in range(0, shape[0], chunk):
            e = min(s + chunk, shape[0])
            pool[s:e] = torch.randn((e - s,) + shape[1:], dtype=torch.float16, device=DEVICE, generator=gen).to(kv_dtype)
    cpu = torch.Generator().manual_seed(12345)
    tables = [(torch.randperm(pages_one, generator=cpu) + c * pages_one).to(torch.int32).to(DEVICE) for c in range(copies)]
    indptr = (torch.arange(batch + 1, dtype=torch.int32) * per_seq).to(DEVICE)
    last = torch.full((batch,), ctx - (per_seq - 1) * PAGE, dtype=torch.int32, device=DEVICE)
    return k, v, tables, indptr, last


FIRST_PLAN_S = {}  # kv dtype -> seconds of its first plan() (the JIT build or load happens there)


def make_wrapper(torch, flashinfer, ws, args, indptr, indices, last, kv_dtype):
    t0 = time.perf_counter()
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=args.use_tensor_cores,
                                                      backend=args.backend)
    w.plan(indptr, indices, last, HEADS, KV_HEADS, HEAD_DIM, PAGE, pos_encoding_mode="NONE",
           q_data_type=torch.float16, kv_data_type=kv_dtype)
    name = str(kv_dtype).replace("torch.", "")
    if name not in FIRST_PLAN_S:
        FIRST_PLAN_S[name] = time.perf_counter() - t0
        print(f"[{name}] first plan(): {FIRST_PLAN_S[name]:.1f} s (includes the JIT compile/load "
              f"of FlashInfer's decode module)", flush=True)
    return w


def run_kwargs(kv_dtype, torch):
    return {} if kv_dtype == torch.float16 else {"k_scale": 1.0, "v_scale": 1.0}


def check(torch, flashinfer, ws, args, kv_dtype):
    """FlashInfer vs a float32 torch reference on 3 sequences of 1, 17 and 100 tokens."""
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    lens = [1, 17, 100]
    per = [-(-n // PAGE) for n in lens]
    k, v, tables, _, _ = make_cache(torch, kv_dtype, 1, sum(per) * PAGE, 1, gen)
    indices = tables[0][: sum(per)]
    indptr = torch.tensor([0] + [sum(per[: i + 1]) for i in range(3)], dtype=torch.int32, device=DEVICE)
    last = torch.tensor([n - (p - 1) * PAGE for n, p in zip(lens, per)], dtype=torch.int32, device=DEVICE)
    q = torch.randn((3, HEADS, HEAD_DIM), dtype=torch.float16, device=DEVICE, generator=gen)
    out = make_wrapper(torch, flashinfer, ws, args, indptr, indices, last, kv_dtype).run(
        q, (k, v), **run_kwargs(kv_dtype, torch))
    err = 0.0
    for b, n in enumerate(lens):
        pages = indices[indptr[b]:indptr[b + 1]].long()
        kk = k[pages].float().reshape(-1, KV_HEADS, HEAD_DIM)[:n].repeat_interleave(HEADS // KV_HEADS, 1)
        vv = v[pages].float().reshape(-1, KV_HEADS, HEAD_DIM)[:n].repeat_interleave(HEADS // KV_HEADS, 1)
        p = (torch.einsum("hd,lhd->hl", q[b].float(), kk) / math.sqrt(HEAD_DIM)).softmax(-1)
        err = max(err, (torch.einsum("hl,lhd->hd", p, vv) - out[b].float()).abs().max().item())
    return err


def main(argv):
    args = parse_args(argv)
    prepare_environment(args.fi_root)
    import torch
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch")
    import flashinfer

    dev = torch.cuda.get_device_properties(0)
    l2 = getattr(dev, "L2_cache_size", 50 << 20)
    info = {"benchmark": "peer_flashinfer_decode", "flashinfer": flashinfer.__version__,
            "flashinfer_path": os.path.dirname(flashinfer.__file__), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "nvcc": nvcc_version(), "gpu": dev.name,
            "sms": dev.multi_processor_count, "l2_bytes": l2, "python": platform.python_version(),
            "shape": {"batch": args.batch, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                      "page_size": PAGE, "layout": "NHD"},
            "backend": args.backend, "use_tensor_cores": args.use_tensor_cores}
    print(f"flashinfer {info['flashinfer']} ({info['flashinfer_path']}), torch {info['torch']} "
          f"(CUDA {info['torch_cuda']}), nvcc: {info['nvcc']}")
    print(f"device: {dev.name}, {dev.multi_processor_count} SMs, L2 {l2 / 1e6:.0f} MB")
    info["copy_gbps"] = copy_bw = copy_bandwidth(torch, args.copy_iters)
    print(f"D2D copy bandwidth (read+write, torch copy_ of 2 GiB): {copy_bw:.0f} GB/s")
    cyc = sleep_cycles_per_us(torch)
    info["timing"] = "events per call, queued behind torch.cuda._sleep" if cyc else "events per call, synchronized"
    ws = torch.zeros(256 << 20, dtype=torch.uint8, device=DEVICE)
    results, errors, checks, failed = [], [], [], False

    if args.check:
        for name in args.kv_dtypes:
            try:
                err = check(torch, flashinfer, ws, args, getattr(torch, KV_DTYPES[name]))
                ok = err < 2e-2
                failed |= not ok
                checks.append({"kv_dtype": name, "max_abs_err": err, "ok": ok})
                print(f"check {name}: max |flashinfer - torch| = {err:.2e} ({'ok' if ok else 'FAIL'})")
            except Exception as e:  # report and go on: the timing may still work
                failed = True
                checks.append({"kv_dtype": name, "error": repr(e)})
                print(f"check {name}: error: {e!r}")
        sys.stdout.flush()

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for ctx in args.contexts:
        for name in args.kv_dtypes:
            kv_dtype = getattr(torch, KV_DTYPES[name])
            try:
                kv_bytes = 2.0 * args.batch * ctx * KV_HEADS * HEAD_DIM * kv_dtype.itemsize
                copies = min(16, max(1, math.ceil(4.0 * l2 / kv_bytes)))
                k, v, tables, indptr, last = make_cache(torch, kv_dtype, args.batch, ctx, copies, gen)
                q = torch.randn((args.batch, HEADS, HEAD_DIM), dtype=torch.float16, device=DEVICE, generator=gen)
                out = torch.empty_like(q)
                kw = run_kwargs(kv_dtype, torch)
                t0 = time.perf_counter()
                wrappers = [make_wrapper(torch, flashinfer, ws, args, indptr, t, last, kv_dtype) for t in tables]
                wrappers[0].run(q, (k, v), out=out, **kw)
                torch.cuda.synchronize()
                setup_s = time.perf_counter() - t0
                calls = [lambda w=w: w.run(q, (k, v), out=out, **kw) for w in wrappers]
                iters = args.iters or (30 if ctx >= 32768 else 100)
                us, host_us, blocked = time_calls(torch, calls, iters, args.warmup, cyc)
                if not torch.isfinite(out).all().item():
                    raise RuntimeError("non-finite decode output")
                step_bytes = kv_bytes + out.numel() * out.element_size()
                gbps = step_bytes / (us * 1e-6) / 1e9
                try:
                    resolved = wrappers[0].resolved_backend
                except Exception:
                    resolved = args.backend
                results.append({"kv_dtype": name, "context": ctx, "copies": copies, "iters": iters, "us": us,
                                "gbps": gbps, "frac_copy": gbps / copy_bw, "bytes": step_bytes,
                                "host_us_per_call": host_us, "plan_and_first_run_s": setup_s,
                                "backend": resolved, "run_blocked_host": blocked})
                print(f"ctx {ctx:5d} {name:9s} copies {copies:2d}: {us:9.1f} us  {gbps:6.0f} GB/s  "
                      f"{100 * gbps / copy_bw:5.1f}% of copy  (host {host_us:.0f} us/call"
                      f"{', run() blocked the host: times include host gaps' if blocked else ''})")
            except Exception as e:  # e.g. a dtype this version or GPU does not support
                errors.append({"kv_dtype": name, "context": ctx, "error": repr(e)})
                print(f"ctx {ctx:5d} {name:9s}: FAILED: {e!r}")
                traceback.print_exc(limit=3)
            finally:
                k = v = tables = q = out = wrappers = calls = None
                torch.cuda.empty_cache()
            sys.stdout.flush()

    print(f"\nFlashInfer {info['flashinfer']} BatchDecodeWithPagedKVCacheWrapper ({args.backend}"
          f"{', tensor cores' if args.use_tensor_cores else ''}), torch {info['torch']}, "
          f"CUDA {info['torch_cuda']}, {dev.name}; D2D copy {copy_bw:.0f} GB/s\n")
    print("| kv dtype | context | time (us) | GB/s | % of D2D copy | host us/call |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['kv_dtype']} | {r['context']} | {r['us']:.1f} | {r['gbps']:.0f} | "
              f"{100 * r['frac_copy']:.1f}% | {r['host_us_per_call']:.0f} |")
    for e in errors:
        print(f"| {e['kv_dtype']} | {e['context']} | failed: {e['error'][:80]} | | | |")
    if args.json:
        info.update(results=results, errors=errors, checks=checks, first_plan_s=FIRST_PLAN_S)
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
        print(f"\nwrote {args.json}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
