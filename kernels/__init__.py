"""Numeric kernels: numpy references (and, later, native and Metal fast paths)."""
