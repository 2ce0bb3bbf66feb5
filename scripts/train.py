"""Fine-tune from the command line (same as ``sd-tf train``): ``python scripts/train.py --data DIR --output DIR``."""

import sys

from sd_tf.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
