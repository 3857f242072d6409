"""The objective layer: tensors in, tensors out.

`losses` (the three channels and their composition), `teacher` (the EMA SDPO teacher), `replay`
(the DPO pair store and the feed that fills it), `batching` (the one padding rule). No config
objects and no file I/O here; the only project import allowed is `trainer.traces` (mined pairs).
"""
