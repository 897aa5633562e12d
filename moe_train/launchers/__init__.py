"""Launcher glue. Every launcher runs the same ``moe_train.train.trainer.train(cfg)``:

- torchrun and the deepspeed launcher need none (``launch/train.py``); the
  DeepSpeed engine itself is one of the loop's engines
  (:mod:`moe_train.train.engine_deepspeed`, when ``train.deepspeed_config`` is set);
- :mod:`moe_train.launchers.ray` runs ``train`` on Ray Train workers and
  resumes a restarted worker group from the run directory
  (``launch/ray_train.py``).

See docs/launching.md. Nothing here is imported unless that launcher is used,
so DeepSpeed and Ray stay optional at run time.
"""
