"""Inference on a trained checkpoint: ``moe-train generate`` (sampling with a
KV cache, :mod:`moe_train.infer.generate`) and ``moe-train eval`` (loss,
perplexity and bits per byte, :mod:`moe_train.infer.evaluate`)."""
