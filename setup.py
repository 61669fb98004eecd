"""Build the optional C accelerator for the hash ring.

Everything else is declared in pyproject.toml. The extension is optional: without a C
compiler the pure-Python implementation (same results, slower) is used instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cloister.ring._native",
            sources=["src/cloister/ring/_native.c"],
            optional=True,
            extra_compile_args=["-O3"],
        )
    ]
)
