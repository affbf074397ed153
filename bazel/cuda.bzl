"""CUDA with Bazel 4 and no rules_cuda: nvcc in genrules.

Every CUDA target is tagged `manual`, so `bazel build //...` and
`bazel test //...` never touch it and the CPU build never needs CUDA. The nvcc
command is selected by --define=cuda=on (`--config=cuda` in .bazelrc); without
it, building a CUDA target explicitly fails with a message saying so.

    bazel build --config=cuda //:cuda          # every CUDA library and binary
    bazel test --config=cuda //:gpu_tests      # GPU tests (skip without a GPU)
"""

load("@rules_cc//cc:defs.bzl", "cc_library")

NVCC = "/usr/local/cuda/bin/nvcc"

# As CMake's CMAKE_CUDA_ARCHITECTURES "90a-real 90-real" and Release flags.
NVCC_FLAGS = [
    "-O3",
    "-DNDEBUG",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=sm_90",
]

def _cc_headers_impl(ctx):
    return [DefaultInfo(files = depset(transitive = [
        dep[CcInfo].compilation_context.headers
        for dep in ctx.attr.deps
    ]))]

# The headers (transitively) declared by cc_library targets, as plain files:
# the inputs an nvcc genrule needs to see in its sandbox.
cc_headers = rule(
    implementation = _cc_headers_impl,
    attrs = {"deps": attr.label_list(providers = [CcInfo])},
)

def nvcc_objects(name, srcs, hdrs = [], deps = [], std = "c++20", visibility = None):
    """One nvcc genrule per .cu file; `name` is a filegroup of the objects.

    Args:
      name: filegroup of the .o files.
      srcs: .cu files, each compiled on its own (parallel, as in CMake).
      hdrs: headers of this package the sources include (.h, .cuh).
      deps: cc_library targets whose headers the sources include.
      std: C++ dialect (CMake's CUDA_STANDARD).
      visibility: of the filegroup.
    """
    cc_headers(name = name + "_dep_hdrs", deps = deps, tags = ["manual"])
    flags = " ".join(NVCC_FLAGS + ["-std=" + std, "-I.", "-I$(GENDIR)"])
    objs = []
    for src in srcs:
        obj = "_nvcc/%s/%s.o" % (name, src.rsplit(".", 1)[0])
        native.genrule(
            name = "%s_%s" % (name, src.rsplit(".", 1)[0].replace("/", "_")),
            srcs = [src] + hdrs + [name + "_dep_hdrs"],
            outs = [obj],
            cmd = select({
                "//bazel:cuda_on": "%s %s -c $(location %s) -o $@" % (NVCC, flags, src),
                "//conditions:default": "echo 'CUDA targets need --config=cuda (--define=cuda=on)' >&2; exit 1",
            }),
            message = "nvcc " + src,
            tags = ["manual"],
        )
        objs.append(obj)
    native.filegroup(name = name, srcs = objs, tags = ["manual"], visibility = visibility)

def strata_cuda_library(name, srcs, hdrs = [], private_hdrs = [], deps = [], std = "c++20",
                        visibility = None):
    """A static library of .cu files (CMake: add_library(STATIC) of CUDA sources).

    Args:
      name: library name, as in CMake.
      srcs: .cu files.
      hdrs: public headers (plain C++: includable from .cc files).
      private_hdrs: headers only the .cu files include (.cuh, internals).
      deps: cc_library dependencies (their headers are visible to nvcc).
      std: C++ dialect (CMake's CUDA_STANDARD).
      visibility: as usual.
    """
    nvcc_objects(
        name = name + "_objs",
        srcs = srcs,
        hdrs = hdrs + private_hdrs,
        deps = deps,
        std = std,
    )
    cc_library(
        name = name,
        srcs = [name + "_objs"],
        hdrs = hdrs,
        deps = deps + ["@local_cuda//:cudart"],
        linkstatic = True,
        tags = ["manual"],
        visibility = visibility,
    )
