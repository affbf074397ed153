#!/usr/bin/python3
"""Stream a generation from `strata serve` with grpcio.

Needs Debian's python3-grpcio and python3-grpc-tools (tools/setup.sh installs
them) and runs with /usr/bin/python3. The stubs are generated at run time from
proto/strata_v1_generation.proto into a temporary directory; nothing generated
is committed.

    build/scheduler/strata serve --port 50051 &
    /usr/bin/python3 examples/python_client.py --server localhost:50051 \
        --prompt "Once upon a time" --max-tokens 40
"""
import argparse
import importlib
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

PROTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "proto")


def load_stubs(out_dir):
    rc = protoc.main([
        "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        os.path.join(PROTO_DIR, "strata_v1_generation.proto"),
    ])
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, out_dir)
    return (importlib.import_module("strata_v1_generation_pb2"),
            importlib.import_module("strata_v1_generation_pb2_grpc"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="localhost:50051")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--auth-token-file", help="bearer token for a server started with one")
    ap.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        pb, pb_grpc = load_stubs(tmp)
        stub = pb_grpc.GenerationStub(grpc.insecure_channel(args.server))
        metadata = []
        if args.auth_token_file:
            with open(args.auth_token_file) as f:
                metadata.append(("authorization", "Bearer " + f.read().strip()))

        info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10)
        print(f"[{info.model}: {info.kv_cache_dtype}/{info.kv_scale_mode} KV cache, "
              f"{info.gpu_blocks.total} blocks of {info.block_size} tokens, "
              f"context {info.max_context}]", file=sys.stderr)

        # Text fields of requests are bytes holding UTF-8.
        request = pb.GenerateRequest(
            text=args.prompt.encode(),
            sampling=pb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                       stop=[s.encode() for s in args.stop]))
        print(args.prompt, end="", flush=True)
        last = None
        try:
            for chunk in stub.Generate(request, metadata=metadata, timeout=args.timeout):
                print(chunk.text, end="", flush=True)
                last = chunk
        except grpc.RpcError as e:  # the status code says whether to retry
            sys.exit(f"\n{e.code().name}: {e.details()}")
        print()
        print(f"[{pb.FinishReason.Name(last.finish_reason)}: {last.usage.prompt_tokens} prompt + "
              f"{last.usage.completion_tokens} generated tokens]", file=sys.stderr)


if __name__ == "__main__":
    main()
