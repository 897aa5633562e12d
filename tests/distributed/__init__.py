"""Multi-process tests on gloo (2-4 local ranks): parallel runs against
single-process references built from the same seed and the same global tokens."""
