"""``python -m moe_train.train [--config CFG] [--set k=v ...] [--run-dir DIR] [--resume [PATH]]``."""
import sys

from moe_train.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:], prog="python -m moe_train.train"))
