"""The ``sd-tf`` console command: ``sd-tf generate ...`` and ``sd-tf train ...``."""

import sys

COMMANDS = ("generate", "train")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: sd-tf {{{','.join(COMMANDS)}}} [options]   (sd-tf COMMAND --help for its options)",
              file=sys.stderr)
        return 2
    if argv[0] == "generate":
        from sd_tf.generate_cli import main as command
    else:
        from sd_tf.train_cli import main as command
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
