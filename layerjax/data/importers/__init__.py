"""Importers: public layered datasets in their released formats -> `LayeredSample`s.

Each module has `rows(...)` (cheap, yields one raw record per sample) and `to_sample(row)`
(decodes and renders; raises `SampleError` naming the sample and field), so a caller can
skip and count bad records. `python -m layerjax.data.importers` writes the on-disk form.
"""
