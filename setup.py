"""The optional native accelerator of vmafs's block sums (vmafs/format/_blocksums.c); the rest
of the package is described in pyproject.toml. Without a C compiler or libxxhash-dev the build
skips it (optional=True) and vmafs.format.index computes the same sums in Python."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("vmafs.format._blocksums", ["vmafs/format/_blocksums.c"],
                             extra_compile_args=["-O3"], libraries=["m"], optional=True)])
