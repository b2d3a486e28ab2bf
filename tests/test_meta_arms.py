"""The meta kind of the experiment harness (bench/meta_arms.py): every arm sees the same number
of training images, the good-only pool drops bad pseudo-labels and nothing else, the type router
decides from the images (not the recorded type), and bad arm reads are named."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import meta_arms  # noqa: E402
from lesionflow import config  # noqa: E402
from lesionflow.data.manifest import FINGERPRINT, Record, read_manifest, write_manifest  # noqa: E402


def record(rid: str, kind: str = "still", split: str = "train", lesion_type: str = "benign",
           quality: str | None = None, mask: bool = True) -> Record:
    return Record(id=rid, kind=kind, image=f"images/{rid}.png", mask=f"masks/{rid}.png" if mask else None,
                  image_sha256="0" * 64, mask_sha256="0" * 64 if mask else None, height=8, width=8,
                  channels=1, lesion_type=lesion_type, group=rid, split=split, source=f"{rid}.png",
                  quality=quality)


def write_dataset(root: Path, records: list[Record], bright: set[str] = frozenset()) -> Path:
    """Records on disk: 8×8 gray images (bright for ids in ``bright``) and empty masks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for r in records:
        Image.fromarray(np.full((8, 8), 220 if r.id in bright else 30, np.uint8)).save(root / r.image)
        if r.mask:
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / r.mask)
    (root / FINGERPRINT).write_text("{}")
    write_manifest(root, records)
    return root


def pool_records() -> list[Record]:
    return ([record(f"truth{i}") for i in range(3)]
            + [record(f"good{i}", kind="pseudo_label", quality="good") for i in range(4)]
            + [record(f"bad{i}", kind="pseudo_label", quality="bad", lesion_type="malignant") for i in range(5)]
            + [record("val0", split="val")])


def test_every_arm_sees_the_same_number_of_training_images(tmp_path):
    data = write_dataset(tmp_path / "pool", pool_records())
    n_train = 24  # the whole train split, labelled or not
    base = config.load(REPO / "params.yaml", ["train.epochs=2", "meta_train.support_size=4",
                                               "meta_train.query_size=2"])
    plain = meta_arms.budgeted(base.with_section("meta_train", enabled=False), data, n_train)
    assert plain.train.epochs * 12 == 2 * n_train  # 12 labelled train records
    meta = meta_arms.budgeted(base.with_section("meta_train", enabled=True), data, n_train)
    assert meta.meta_train.outer_steps * (4 + 2) == 2 * n_train
    per_type = meta_arms.budgeted(base.with_section("meta_train", enabled=True, per_lesion_type=True), data, n_train)
    assert per_type.meta_train.outer_steps * (4 + 2) * 2 == 2 * n_train  # two types share the budget


def test_the_good_pool_drops_bad_pseudo_labels_only_and_reads_images_after_the_rename(tmp_path):
    records = pool_records() + [record("unlabelled0", kind="unlabelled", mask=False)]
    staged = write_dataset(tmp_path / "staged", records)
    meta_arms.keep_good_only(staged, tmp_path / "good", linked_as=Path("..") / "pool")
    staged.rename(tmp_path / "pool")  # the pool is renamed into place after the good copy is made
    kept = {r.id for r in read_manifest(tmp_path / "good")}
    assert kept == {r.id for r in records} - {f"bad{i}" for i in range(5)}
    assert (tmp_path / "good" / "images" / "good0.png").is_file()


class Brightness:
    """A stand-in segmenter: lesion probability = the pixel's brightness (or its inverse)."""

    def __init__(self, invert: bool):
        self.invert = invert

    def predict_proba(self, images, batch_size=8, lesion_types=None):
        return [(1 - im / 255.0) if self.invert else im / 255.0 for im in images]


class TwoModels:
    models = {"bright": Brightness(False), "dark": Brightness(True)}


def test_the_type_router_decides_from_the_image_not_the_recorded_type(tmp_path):
    train = [record(f"b{i}", lesion_type="bright") for i in range(6)] + [record(f"d{i}", lesion_type="dark")
                                                                        for i in range(6)]
    data = write_dataset(tmp_path / "d", train + [record("x", split="test")], bright={f"b{i}" for i in range(6)} | {"x"})
    router = meta_arms.ClassifiedRouter(TwoModels(), data, train, threshold=0.5)
    image = np.asarray(Image.open(data / "images" / "x.png"))
    assert router.predict_types([image]) == ["bright"]
    # the recorded type ("dark") is ignored: the image goes to the bright model
    prob = router.predict_proba([image], lesion_types=["dark"])[0]
    assert prob.mean() > 0.8


@pytest.mark.parametrize("arm, message", [({"data": "some"}, "data must be"),
                                          ({"routing": "oracle"}, "routing given|classifier"),
                                          ({"routing": "classifier"}, "needs per-type models")])
def test_bad_arm_reads_are_named_before_anything_runs(arm, message, tmp_path):
    params = config.load(REPO / "params.yaml", ["meta_train.enabled=false"])
    with pytest.raises(SystemExit, match=message):
        meta_arms.run_arm(params, tmp_path / "no-dataset", arm, 0, tmp_path)
