"""Every job script's --help works without a cluster (as ``ray job submit`` users first run it) and names
the files its data must be in: the help is the only documentation a job submitter sees."""

import subprocess
import sys
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parents[1] / "jobs"

# What each job's --help must name: the files or folders of its data layout, as its sources read them.
LAYOUT = {
    "clothing1m.py": ["category_names_eng.txt", "noisy_label_kv.txt", "clean_label_kv.txt", "images/"],
    "webvision.py": [
        "info/train_filelist_google.txt",
        "info/val_filelist.txt",
        "val_images_256/",
        "imagenet/val/",
    ],
    "cifar.py": ["cifar-10-batches-py/", "cifar-100-python/", "data_batch_1", "test_batch"],
    "sweep.py": ["cifar-10-batches-py/", "data_batch_1", "test_batch"],
    "text.py": ["train.csv", "test.csv", "senti.binary.train"],
}


def test_every_job_declares_its_layout():
    assert {p.name for p in JOBS.glob("*.py")} <= set(LAYOUT)


@pytest.mark.parametrize("job", sorted(LAYOUT))
def test_job_help_names_its_data(job):
    script = JOBS / job
    if not script.exists():
        pytest.skip(f"jobs/{job} is not written yet")
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120, cwd=JOBS.parent
    )
    assert done.returncode == 0, done.stderr
    words = " ".join(done.stdout.split())  # the command may wrap in the docstring
    assert f"ray job submit --working-dir . -- python jobs/{job}" in words
    missing = [name for name in LAYOUT[job] if name not in done.stdout]
    assert not missing, f"jobs/{job} --help does not name {missing}"
