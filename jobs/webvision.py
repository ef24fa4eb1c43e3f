"""Train on mini-WebVision: ``ray job submit --working-dir . -- python jobs/webvision.py --data-root ...``.

mini-WebVision is the first 50 classes of the Google half of WebVision 1.0 (65,944 web images whose labels
are the search queries), tested on the human-checked WebVision validation images of those classes.
--dataset webvision trains on all 1000 classes, Google and Flickr (~2.4M images). No trusted set ships
with either: --method ce, mixnn or mlnt (the methods that need one are refused before Ray starts).

Data: WebVision 1.0 from https://data.vision.ee.ethz.ch/cvl/webvision/download.html (the resized
"small version" is enough: the preset trains at 224 px), unpacked so that --data-root holds

    info/train_filelist_google.txt    path label, one image per line (+ info/train_filelist_flickr.txt
                                      for --dataset webvision); paths relative to --data-root
    info/val_filelist.txt             file label, files under val_images_256/ (or val_images/)
    info/synsets.txt                  optional: class names
    google/...                        the training images the file lists name
    val_images_256/                   the WebVision validation images
    imagenet/val/<class index>/*.JPEG optional: the ILSVRC2012 validation images of the same classes
                                      (https://image-net.org, ILSVRC2012_img_val.tar), one folder per
                                      class index in WebVision's (= ILSVRC's synset) order: 0 .. 49
                                      for mini-WebVision

What is reported: top-1 and top-5 on WebVision val and on ILSVRC12 val separately, as the literature
reports them. With imagenet/val/ present, metrics.json's test_sets holds both per set ("webvision-val",
"ilsvrc12-val") for the reported model (top1, top5) and the last epoch (final_top1, final_top5), and the
run prints one line per set:

    [train]   ilsvrc12-val: top-1 0.xxxx, top-5 0.xxxx (best-val model)
    [train]   webvision-val: top-1 0.xxxx, top-5 0.xxxx (best-val model)

test_accuracy and test_top5_accuracy pool the two sets; without imagenet/val/ they are WebVision val's
(and test_sets is empty). There is no validation split (no clean training labels to select on), so the
reported model is the last epoch's.

Defaults come from the preset raynoisy/configs/webvision-mini/<method>.yaml (ResNet-50 from scratch,
224 px, SGD 0.01, batch 32, 80 epochs, lr x0.1 at 40): run it on GPUs, e.g.

    ray job submit --working-dir . -- python jobs/webvision.py --data-root /mnt/webvision --method mlnt \\
        --workers 8 --gpus-per-worker 1 --output /home/ray/runs/webvision-mlnt \\
        --set run.storage_path=s3://BUCKET/raynoisy --set data.shard_root=s3://BUCKET/raynoisy/shards

With --method mixnn on GPUs, give its kNN index a share of one: ``--gpus-per-worker 0.9 --set
method.params.index_gpus=0.1`` (the index actor then shares a GPU with a worker and searches there). On its
CPU share alone the index took 61-89% of an epoch on an H200 (benchmarks/README.md, "On a GPU").

Without ``ray job submit`` (``python jobs/webvision.py --data-root ...``) Ray starts a local cluster.
"""

import sys

from raynoisy.cli import train_job

if __name__ == "__main__":
    sys.exit(train_job(description=__doc__, dataset="webvision-mini", output="runs/webvision-mini"))
