"""strata_proto_library: the Bazel twin of proto/CMakeLists.txt's function.

Runs the system protoc (and grpc_cpp_plugin for services) in a genrule, with
the repository root as the import path, so generated headers are included as
"proto/xxx.pb.h" exactly as in the CMake build. One small cc_library per proto
keeps generated code compiling in parallel.
"""

_PROTOC = "/usr/bin/protoc"
_GRPC_PLUGIN = "/usr/bin/grpc_cpp_plugin"

def strata_proto_library(name, srcs, deps = [], grpc = False, visibility = None):
    """One cc_library `name` with the C++ (and gRPC) code generated from `srcs`.

    Args:
      name: library name (as in CMake, e.g. strata_proto_sentencepiece).
      srcs: .proto files of this package.
      deps: other strata_proto_library targets whose protos `srcs` import.
      grpc: also generate gRPC service stubs.
      visibility: as usual.
    """
    outs = []
    for src in srcs:
        base = src[:-len(".proto")]
        outs += [base + ".pb.h", base + ".pb.cc"]
        if grpc:
            outs += [base + ".grpc.pb.h", base + ".grpc.pb.cc"]

    # This library's .proto files plus everything they may import.
    native.filegroup(
        name = name + "_protos",
        srcs = srcs + [d + "_protos" for d in deps],
        visibility = visibility,
    )

    cmd = _PROTOC + " -I. --cpp_out=$(GENDIR)"
    if grpc:
        cmd += " --plugin=protoc-gen-grpc=%s --grpc_out=$(GENDIR)" % _GRPC_PLUGIN
    cmd += " " + " ".join(["$(location %s)" % s for s in srcs])
    native.genrule(
        name = name + "_gen",
        srcs = [name + "_protos"] + srcs,
        outs = outs,
        cmd = cmd,
        message = "protoc " + " ".join(srcs),
    )

    native.cc_library(
        name = name,
        srcs = [o for o in outs if o.endswith(".cc")],
        hdrs = [o for o in outs if o.endswith(".h")],
        deps = deps + ["@system//:protobuf"] + (["@system//:grpcpp"] if grpc else []),
        linkstatic = True,  # like add_library(STATIC); see strata_cc_library
        visibility = visibility,
    )
