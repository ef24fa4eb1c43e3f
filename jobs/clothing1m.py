"""Train on Clothing1M: ``ray job submit --working-dir . -- python jobs/clothing1m.py --method mlc ...``.

Without --data-root it generates a miniature Clothing1M in the official layout and trains on it on a
local Ray cluster in a few minutes. With --data-root /path/to/clothing1M the same code runs the real
data set (trusted set = clean_train, model selection on clean_val, test on clean_test). The folder must
hold category_names_eng.txt, noisy_label_kv.txt, clean_label_kv.txt, the *_key_list.txt files and images/.
The preset's ImageNet-pretrained ResNet-50 needs torchvision's weights in the hub cache or a download; on
a machine without internet pass --set model.pretrained=/path/to/resnet50-weights.pth.
"""

import sys

from raynoisy.cli import train_job

if __name__ == "__main__":
    sys.exit(train_job(description=__doc__, dataset="clothing1m", output="runs/clothing1m"))
