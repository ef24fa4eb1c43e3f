"""Accuracy against the noise rate, as a Ray Tune grid: ``ray job submit --working-dir . -- python
jobs/sweep.py --data-root ...``.

One trial per method x noise rate x seed, each exactly a ``raynoisy train`` run with the method's preset;
the outputs are results.csv, results.md (mean +- std over seeds) and accuracy_vs_noise.png in --output,
and every trial's run folder under --output/runs/. Re-running the same command skips finished trials.

Defaults: CIFAR-10 with flip noise at 0.2 and 0.4 (the flip columns of the MW-Net and MLC tables), methods
ce, glc, mwnet and mlc, one seed. Data: the "python version" of CIFAR-10 from
https://www.cs.toronto.edu/~kriz/cifar.html (cifar-10-python.tar.gz), unpacked: --data-root holds
cifar-10-batches-py/ (data_batch_1 .. 5, test_batch, batches.meta). Any other data set and protocol takes
the same flags (--dataset cifar100, fashion-mnist with its four idx .gz files, ...; --noise uniform,
symmetric, pair, matrix:PATH); --dataset digits needs no data at all (scikit-learn's bundled digits):

    python jobs/sweep.py --dataset digits --methods ce,glc --rates 0,0.4 --epochs 3 --output runs/sweep-digits

On a cluster, --output must be on storage every node sees (the trials write their folders there):

    ray job submit --working-dir . -- python jobs/sweep.py --data-root /mnt/cifar --seeds 3 \\
        --workers 1 --gpus-per-worker 1 --output /mnt/shared/sweeps/cifar10-flip \\
        --set data.shard_root=s3://BUCKET/raynoisy/shards

Trials run side by side as far as the cluster's CPUs and GPUs allow, each leaving Ray Data a CPU.
"""

import sys

from raynoisy.cli import sweep_job

if __name__ == "__main__":
    sys.exit(
        sweep_job(
            description=__doc__,
            dataset="cifar10",
            methods="ce,glc,mwnet,mlc",
            noise="flip",
            rates="0.2,0.4",
            output="runs/sweep-cifar10-flip",
        )
    )
