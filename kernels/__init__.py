"""Numeric kernels: numpy references (`reference`), the native attention tracker that
serves llama.cpp's eval callback (`tracker.c`, with its Python twin in `tracker`), and the
Metal kernels of the exact path (`metal`, with numpy twins in `reference`)."""
