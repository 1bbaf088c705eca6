"""Build the C core `kvstore._native` from kvstore/_native/*.c.

The C sources live in their own folder, which is not a Python package, so they
are not shipped as package data. Set KVSTORE_SANITIZE=1 to build with
AddressSanitizer and UBSan (used by .ci/run).
"""
import glob
import os

from setuptools import Extension, setup

cflags = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-Wno-missing-field-initializers", "-fno-strict-aliasing"]
ldflags = []
undef = []
if os.environ.get("KVSTORE_SANITIZE") == "1":
    cflags = [f for f in cflags if not f.startswith("-O")]
    cflags += ["-O1", "-g", "-fno-omit-frame-pointer",
               "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    ldflags += ["-fsanitize=address,undefined"]
    undef = ["NDEBUG"]

setup(
    ext_modules=[
        Extension(
            "kvstore._native",
            sources=sorted(glob.glob("kvstore/_native/*.c")),
            depends=sorted(glob.glob("kvstore/_native/*.h")),
            include_dirs=["kvstore/_native"],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
            undef_macros=undef,
        )
    ]
)
