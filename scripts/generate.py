"""Generate images from the command line: ``python scripts/generate.py "a red circle on a blue background"``."""

import sys

from sd_tf.generate_cli import main

if __name__ == "__main__":
    sys.exit(main())
