#!/usr/bin/env python3
"""Reference byte-level BPE encodings for runtime/bpe_tokenizer_test.cc.

Builds a Hugging Face `tokenizers` BPE tokenizer (PyPI package `tokenizers`)
from the vocabulary and merges of a GGUF file (read with the PyPI `gguf`
package, not with Strata's reader), with SmolLM2's pre-tokenizer
(Digits(individual_digits=True) then ByteLevel(add_prefix_space=False)),
and encodes texts. Runs in its own process; the C++ test compares ids.

Usage:
  python bpe_reference.py --gguf model.gguf --input in.json
  python bpe_reference.py --check      # exit 0 iff tokenizers and gguf import (3 otherwise)

in.json:  {"texts": ["...", ...], "files": ["path", ...], "split_digits": true}
stdout:   {"tokenizers_version": "...", "ids": [[...] per text, then per file],
           "decoded": ["..." per entry]}
Interpreter: see tests/tools/make_reference_venv.py.
"""

import argparse
import json
import sys


def field_strings(reader, key):
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf")
    parser.add_argument("--input")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    try:
        import gguf
        import tokenizers
        from tokenizers import decoders, models, pre_tokenizers
    except ImportError as e:
        print(f"reference modules not available: {e}", file=sys.stderr)
        return 3
    if args.check:
        return 0
    if not args.gguf or not args.input:
        parser.error("--gguf and --input are required")

    reader = gguf.GGUFReader(args.gguf)
    tokens = field_strings(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field_strings(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    with open(args.input, encoding="utf-8") as f:
        request = json.load(f)
    steps = []
    if request.get("split_digits", True):
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()

    texts = list(request.get("texts", []))
    for path in request.get("files", []):
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    ids = [tk.encode(t, add_special_tokens=False).ids for t in texts]
    result = {
        "tokenizers_version": tokenizers.__version__,
        "ids": ids,
        "decoded": [tk.decode(x, skip_special_tokens=False) for x in ids],
    }
    json.dump(result, sys.stdout, ensure_ascii=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
