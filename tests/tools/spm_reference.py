#!/usr/bin/python3
"""Reference SentencePiece encodings for runtime/tokenizer_test.cc.

Runs the real SentencePiece (Debian's python3-sentencepiece) in its own
process: the C++ library cannot share a process with gRPC's protobuf, so the
C++ test shells out to this script. Always run it with /usr/bin/python3 (the
interpreter that has the module).

Usage:
  /usr/bin/python3 spm_reference.py --model tokenizer.model --input in.json
  /usr/bin/python3 spm_reference.py --check    # exit 0 iff the module imports

in.json:  {"texts": ["...", ...], "id_lists": [[1, 2, ...], ...]}
stdout:   {"sentencepiece_version": "...",
           "ids": [[...] per text],            # sp.encode(text)
           "decoded": ["..." per text],        # sp.decode(sp.encode(text))
           "decoded_id_lists": ["..." per id list]}   # sp.decode(ids)
"""

import argparse
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="SentencePiece tokenizer.model")
    parser.add_argument("--input", help="JSON file with texts and id lists")
    parser.add_argument("--check", action="store_true",
                        help="only check that the sentencepiece module imports")
    args = parser.parse_args()

    try:
        import sentencepiece as spm
    except ImportError as e:
        print(f"sentencepiece module not available: {e}", file=sys.stderr)
        return 3
    if args.check:
        return 0
    if not args.model or not args.input:
        parser.error("--model and --input are required")

    sp = spm.SentencePieceProcessor(model_file=args.model)
    with open(args.input, encoding="utf-8") as f:
        request = json.load(f)
    texts = request.get("texts", [])
    id_lists = request.get("id_lists", [])

    ids = [sp.encode(t) for t in texts]
    result = {
        "sentencepiece_version": getattr(spm, "__version__", "unknown"),
        "ids": ids,
        "decoded": [sp.decode(x) for x in ids],
        "decoded_id_lists": [sp.decode(x) for x in id_lists],
    }
    json.dump(result, sys.stdout, ensure_ascii=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
