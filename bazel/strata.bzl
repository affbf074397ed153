"""Macros shared by the BUILD.bazel files (twins of the CMake helpers)."""

load("@rules_cc//cc:defs.bzl", "cc_library", "cc_test")

def strata_cc_library(name, **kwargs):
    """A cc_library built like CMake's add_library(STATIC).

    linkstatic = True: only the static archive is built. Without it, building
    //... also links a lib<name>.so per library that nothing uses.
    """
    cc_library(name = name, linkstatic = True, **kwargs)

def strata_cc_test(name, srcs, deps = [], data = [], **kwargs):
    """Twin of CMake's strata_cc_test(): a GoogleTest binary with gtest_main and gmock.

    The environment CMake gives tests (STRATA_DATA_DIR, STRATA_SOURCE_DIR,
    STRATA_BINARY_DIR) comes from --test_env in bazel/test.sh. Linked
    statically against the repository's own libraries, as CMake does.
    """
    cc_test(
        name = name,
        srcs = srcs,
        deps = deps + ["@system//:gtest_main", "@system//:gmock"],
        data = data,
        linkstatic = True,
        **kwargs
    )
