"""Gradient and update compression: ``--compress {none,fp16,int8,onebit,powersgd}``."""

from shoal.compression import fp16 as _fp16, int8 as _int8, onebit as _onebit, powersgd as _powersgd  # noqa: F401
from shoal.compression.api import COMPRESSORS, Compressor, register

__all__ = ["COMPRESSORS", "Compressor", "register"]
