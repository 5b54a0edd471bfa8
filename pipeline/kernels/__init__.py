"""Kernels of the merge engine: each op as ``x`` (dispatch), ``x_torch`` and ``x_triton``.

``paths`` decides which runs (Triton for CUDA tensors when installed, PyTorch elsewhere;
``forced_path`` overrides) and is the only module the others import; nothing here imports the rest of
the project. ``attention_mass`` (attention mass of a span, and ``attention_with_lse``),
``decode_attention`` (split-K decode attention), ``fused`` (decode-step elementwise ops) and ``merge``
(the merge step's kernels; their PyTorch twins live in ``pipeline.merging.ops``). Every module imports
without triton: the Triton kernels are defined only where triton can run.
"""
