"""The torch side of sage: the reference architectures (`arch/`), exact eq. 7 gradients
(`exact`) and the training of the SAGE heads (`train`). Everything here imports torch;
nothing on the `sage ask` path imports this package (only `--exact`, `sage heads train`
and `sage convert` do)."""
