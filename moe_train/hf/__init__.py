"""The Hugging Face boundary: HF names and layouts in, moe_train modules out
(import, upcycling) and back (export)."""
