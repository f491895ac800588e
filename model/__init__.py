"""The SAGE model as it runs: llama.cpp engine, steps, trace (and, later, inverse analysis)."""

__version__ = "0.1.0"
