"""Launcher glue. Every launcher runs the same ``moe_train.train.trainer.train(cfg)``:

- torchrun needs none (``launch/train.py``);
- :mod:`moe_train.launchers.deepspeed` puts the DeepSpeed engine (ZeRO 0/1/2,
  bf16) around the model ``train`` built, when ``train.deepspeed_config`` is set;
- :mod:`moe_train.launchers.ray` runs ``train`` on Ray Train workers and
  resumes a restarted worker group from the run directory
  (``launch/ray_train.py``).

See docs/launching.md. Nothing here is imported unless that launcher is used,
so DeepSpeed and Ray stay optional at run time.
"""
