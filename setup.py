"""Builds the native attention tracker (kernels/tracker.c). It is a plain C library
loaded with ctypes, not a Python extension module; setuptools just compiles it."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sage.kernels._tracker",
            sources=["kernels/tracker.c"],
            # no fused multiply-add, so the numbers equal the numpy reference twin's
            extra_compile_args=["-O2", "-ffp-contract=off"],
        )
    ]
)
