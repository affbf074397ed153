#!/usr/bin/env python3
"""Independent numpy forward pass of a GGUF LLaMA model (SmolLM2-135M) for
tests/accuracy_ci_test.cc.

Reads the file with the PyPI `gguf` package (its own parser and dequantizers,
not Strata's), and runs the model in float64 the way llama.cpp does: q/k
weights as stored (llama.cpp's converter permuted them) with interleaved-pair
("GPT-J"/Meta) RoPE, so it shares neither the reader nor the un-permutation nor
the RoPE convention of the C++ engine. Tied embeddings when there is no
output.weight.

Usage:
  python smollm2_reference.py --gguf model.gguf --ids 1,2,3 --out logits.f32
  python smollm2_reference.py --check     # exit 0 iff gguf and numpy import (3 otherwise)
Writes float32 logits [len(ids)][vocab], row-major, no header.
"""

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf")
    parser.add_argument("--ids")
    parser.add_argument("--out")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    try:
        import gguf
        import numpy as np
        from gguf.quants import dequantize
    except ImportError as e:
        print(f"reference modules not available: {e}", file=sys.stderr)
        return 3
    if args.check:
        return 0
    if not (args.gguf and args.ids and args.out):
        parser.error("--gguf, --ids and --out are required")

    r = gguf.GGUFReader(args.gguf)

    def meta(key):
        return r.fields[key].contents()

    tensors = {t.name: t for t in r.tensors}

    def weight(name):
        t = tensors[name]
        w = dequantize(t.data, t.tensor_type)
        return np.asarray(w, dtype=np.float64).reshape([int(d) for d in reversed(t.shape)])

    n_layer = meta("llama.block_count")
    n_head = meta("llama.attention.head_count")
    n_kv = meta("llama.attention.head_count_kv")
    dim = meta("llama.embedding_length")
    eps = meta("llama.attention.layer_norm_rms_epsilon")
    theta = meta("llama.rope.freq_base")
    hd = dim // n_head
    ids = [int(x) for x in args.ids.split(",")]
    T = len(ids)

    emb = weight("token_embd.weight")
    out_w = weight("output.weight") if "output.weight" in tensors else emb
    x = emb[ids]  # [T, dim]

    def rms(v, g):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * g

    pos = np.arange(T)[:, None]
    freqs = theta ** (-np.arange(0, hd, 2) / hd)  # [hd/2]
    ang = pos * freqs[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope_interleaved(v, heads):  # v [T, heads*hd]; pairs (2j, 2j+1)
        v = v.reshape(T, heads, hd // 2, 2)
        a, b = v[..., 0], v[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(T, heads, hd)

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(n_layer):
        p = f"blk.{i}."
        h = rms(x, weight(p + "attn_norm.weight"))
        q = rope_interleaved(h @ weight(p + "attn_q.weight").T, n_head)
        k = rope_interleaved(h @ weight(p + "attn_k.weight").T, n_kv)
        v = (h @ weight(p + "attn_v.weight").T).reshape(T, n_kv, hd)
        rep = n_head // n_kv
        k = np.repeat(k, rep, axis=1)
        v = np.repeat(v, rep, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", att, v).reshape(T, n_head * hd)
        x = x + o @ weight(p + "attn_output.weight").T
        h = rms(x, weight(p + "ffn_norm.weight"))
        g = h @ weight(p + "ffn_gate.weight").T
        u = h @ weight(p + "ffn_up.weight").T
        x = x + ((g / (1 + np.exp(-g))) * u) @ weight(p + "ffn_down.weight").T
    logits = rms(x, weight("output_norm.weight")) @ out_w.T
    logits.astype(np.float32).tofile(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
