"""Runs ``sd-tf train`` in a process whose CPU is split into logical devices first.

    python tests/multiworker_train.py [--logical-cpus N] TRAIN ARGS...

Logical devices must be configured before TensorFlow initialises its
devices, so this wrapper does it before importing the training code. The
tests use it for MirroredStrategy over two logical CPUs, and (with
``TF_CONFIG`` set by the test) for MultiWorkerMirroredStrategy workers.
"""

import sys


def main(argv):
    logical_cpus = 1
    if argv[:1] == ["--logical-cpus"]:
        logical_cpus, argv = int(argv[1]), argv[2:]
    import tensorflow as tf

    if logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
    from sd_tf.train_cli import main as train

    return train(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
