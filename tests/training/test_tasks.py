from __future__ import annotations

import pytest
import torch

from tokenmix.training import TrainConfig, train
from tokenmix.training.tasks import create_task

from ..data.test_images import mnist_directory
from ..data.test_spam import spam_package
from .conftest import TINY


def test_batches_depend_only_on_seed_and_step():
    task = create_task(TrainConfig(seq_len=16, batch_size=4))
    a, b = task.train_batch(3), task.train_batch(3)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], task.train_batch(4)[0])
    other_seed = create_task(TrainConfig(seq_len=16, batch_size=4, seed=1))
    assert not torch.equal(a[0], other_seed.train_batch(3)[0])


def test_image_batches_visit_every_example_once_per_epoch(tmp_path):
    config = TrainConfig(task="image-cls", data=str(mnist_directory(tmp_path, train=40)), batch_size=7)
    task = create_task(config)
    images, labels = task._examples("train")  # 36 training images
    seen = torch.cat([task.train_batch(step)[1] for step in range(36)])  # 7 epochs of 36
    for epoch in range(7):
        chunk = seen[epoch * 36 : (epoch + 1) * 36]
        assert torch.equal(chunk.sort().values, labels.sort().values)
    first = torch.cat([task.train_batch(step)[0] for step in range(6)])[:36]
    assert not torch.equal(first, images)  # shuffled


def test_charlm_evaluation_covers_the_split_with_next_byte_targets():
    task = create_task(TrainConfig(seq_len=100, batch_size=8))
    batches = task.eval_batches("val", None)
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    data = task.text.splits["val"][:]
    assert len(inputs) == (len(data) - 1) // 100
    assert torch.equal(inputs.flatten(), data[: inputs.numel()].long())
    assert torch.equal(targets.flatten(), data[1 : inputs.numel() + 1].long())
    assert len(task.eval_batches("val", 3)) == 3


@pytest.mark.parametrize(
    "task,mixer,metric",
    [
        ("image-cls", "softmax", "val_acc"),
        ("image-cls", "aft_conv", "val_acc"),  # on the 2-D patch grid, mean-pooled
        ("image-ar", "softmax", "val_bpd"),
        ("mqar", "softmax", "val_acc"),
    ],
)
def test_every_task_trains_and_reports_its_metric(tmp_path, task, mixer, metric):
    config = dict(TINY, task=task, mixer=mixer, mixer_options={"heads": 2}, steps=4, eval_every=2, lr=3e-3)
    if task.startswith("image"):
        config["data"] = "digits"
    records = train(dict(config, out=str(tmp_path)))
    assert [r["step"] for r in records] == [2, 4]
    assert all(metric in r and r["val_loss"] > 0 for r in records)
    if metric == "val_acc":
        assert all(0 <= r["val_acc"] <= 1 for r in records)
    else:  # bits per pixel of 17-level digits: below uniform (log2 17 ≈ 4.09) only if it learned
        assert 0 < records[-1]["val_bpd"] < 4.09


def test_image_classification_learns_digits(tmp_path):
    config = dict(
        TINY,
        task="image-cls",
        data="digits",
        steps=200,
        eval_every=200,
        warmup_steps=10,
        lr=3e-3,
        batch_size=32,
    )
    records = train(dict(config, out=str(tmp_path), eval_batches=None))
    assert records[-1]["val_acc"] > 0.6  # chance is 0.1


def test_image_tasks_reject_a_patch_that_does_not_divide(tmp_path):
    with pytest.raises(ValueError, match="patch_size=3 must divide the image size 8×8"):
        create_task(TrainConfig(task="image-cls", data="digits", patch_size=3))


# Each generated or sequence task, small enough to learn in seconds: (options, steps, margin over chance).
LEARNS = {
    "mqar": ({"seq_len": 16, "vocab_size": 16, "num_pairs": 2}, 120, 0.2),
    "induction": ({"dim": 64, "seq_len": 32, "vocab_size": 32, "num_tokens": 8}, 150, 0.04),
    "selective-copy": ({"seq_len": 24, "vocab_size": 8, "num_tokens": 4}, 120, 0.2),
    "listops": ({"seq_len": 48}, 120, 0.05),
    "image-seq": ({"dim": 64, "data": "digits"}, 150, 0.4),
}


@pytest.mark.parametrize("task", LEARNS)
def test_each_sequence_task_learns_above_its_chance(tmp_path, task):
    options, steps, margin = LEARNS[task]
    config = dict(TINY, task=task, steps=steps, eval_every=steps, warmup_steps=10, lr=3e-3, batch_size=32,
                  eval_batches=8, **options)  # fmt: skip
    chance = create_task(TrainConfig.from_dict(config)).chance()
    records = train(dict(config, out=str(tmp_path)))
    assert records[-1]["val_acc"] > chance + margin, (records[-1]["val_acc"], chance)


def test_text_classification_learns_spam_from_the_body(tmp_path):
    package = spam_package(tmp_path / "pkg", per_group=30)
    config = dict(TINY, task="text-cls", data=str(package), seq_len=32, steps=30, eval_every=30,
                  warmup_steps=5, lr=3e-3, batch_size=16, eval_batches=None)  # fmt: skip
    assert create_task(TrainConfig.from_dict(config)).chance() == 0.5
    records = train(dict(config, out=str(tmp_path / "run")))
    assert records[-1]["val_acc"] > 0.8
