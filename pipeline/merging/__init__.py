"""FastAdaSP token reduction, model-agnostic: planning and applying merges/evictions, schedules and
calibration (the attention mass is a kernel: ``pipeline.kernels.attention_mass``). See ``ops``,
``schedule`` and ``config``."""
