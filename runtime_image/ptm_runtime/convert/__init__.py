"""The converter (`ptm convert`): checkpoint -> ONNX -> optimized candidates -> validation gate
-> content-addressed artifact and report.

Modules: locations (fetch + digests), sources (load checkpoints), export (torch -> ONNX),
optimize (candidates, pruning), validate (metrics, gate, latency), samples (inputs), store
(atomic local / s3 store), pipeline (the order of work), cli (flags, spec, exit codes).
Importing this package is cheap; torch and onnx load only when a conversion runs.
"""
