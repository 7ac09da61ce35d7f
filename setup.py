"""Only the C shim's cffi builds live here (setuptools reads ``cffi_modules`` from setup());
everything else is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["c_shim/build_dma.py:ffibuilder", "c_shim/build_msg.py:ffibuilder",
                    "c_shim/build_poll.py:ffibuilder"])
