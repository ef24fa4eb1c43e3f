"""Train on CIFAR-10 or CIFAR-100 with synthetic label noise: ``ray job submit --working-dir . -- python
jobs/cifar.py --data-root ... --method mlc``.

Data: the "python version" of CIFAR from https://www.cs.toronto.edu/~kriz/cifar.html
(cifar-10-python.tar.gz, cifar-100-python.tar.gz), unpacked: --data-root is the folder that holds

    cifar-10-batches-py/    data_batch_1 .. data_batch_5, test_batch, batches.meta   (--dataset cifar10)
    cifar-100-python/       train, test, meta                                        (--dataset cifar100)

(or that folder itself). The official test set is the test split; the trusted set and the validation
split are drawn from the 50,000 training images, disjoint by construction.

Defaults: --dataset cifar10 and --noise flip --noise-rate 0.4 (MW-Net's and MLC's flip setting: each
class goes to one random other class with probability 0.4). Being flags, these two win over a --config
file: pass --noise/--noise-rate to change them (--noise uniform, symmetric, pair, none). The rest is the
preset raynoisy/configs/<dataset>/<method>.yaml, the paper's setting for that method: ResNet-32, batch
100, SGD 0.1, wd 5e-4, 120 epochs with lr x0.1 at 80 and 100, 1000 trusted images (100 per class on
CIFAR-10, 10 on CIFAR-100), e.g.

    ray job submit --working-dir . -- python jobs/cifar.py --data-root /mnt/cifar --dataset cifar100 \\
        --method mlc --workers 4 --gpus-per-worker 1 --output /home/ray/runs/cifar100-mlc-flip0.4

Without ``ray job submit`` (``python jobs/cifar.py --data-root ...``) Ray starts a local cluster.
"""

import sys

from raynoisy.cli import train_job

if __name__ == "__main__":
    sys.exit(
        train_job(
            description=__doc__,
            dataset="cifar10",
            output="runs/cifar",
            defaults={"noise": "flip", "noise_rate": 0.4},
        )
    )
