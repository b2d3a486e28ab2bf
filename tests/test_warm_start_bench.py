"""``bench/warm_start.py``'s corrected set: which CVC frames become reviewer corrections, and how
they join the Kvasir dataset (small synthetic datasets on disk, the package's own merge)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from lesionflow import corrections
from lesionflow.data.fingerprint import write_index
from lesionflow.data.manifest import Record, read_manifest, staged_dataset, write_png

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import warm_start  # noqa: E402


def dataset(root: Path, prefix: str, sequences: dict[str, tuple[int, str]]) -> Path:
    """Video frames 16×16: ``sequences`` maps a sequence id to (frame count, split)."""
    rng = np.random.default_rng(ord(prefix))  # the two datasets share no image
    with staged_dataset(root) as stage:
        records = []
        for group, (frames, split) in sequences.items():
            for index in range(frames):
                name = f"{prefix}{group}-{index:02d}"
                mask = np.zeros((16, 16), np.uint8)
                mask[4:10, 4:10] = 255
                records.append(Record(
                    id=name, kind="video_frame", image=f"images/{name}.png", mask=f"masks/{name}.png",
                    image_sha256=write_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
                                           stage / "images" / f"{name}.png"),
                    mask_sha256=write_png(mask, stage / "masks" / f"{name}.png"),
                    height=16, width=16, channels=3, lesion_type="polyp", group=group, split=split,
                    frame_index=index, source=f"{name}.png"))
        write_index(stage, records)
    return root


@pytest.fixture
def cvc(tmp_path) -> Path:
    return dataset(tmp_path / "cvc", "c", {"1": (9, "train"), "2": (5, "train"), "3": (7, "train"),
                                           "4": (8, "test"), "5": (6, "val")})


def test_correction_batch_takes_evenly_spaced_train_frames_of_whole_sequences(cvc):
    batch = warm_start.correction_batch(cvc, n=7, per_sequence=3)
    assert len(batch) == 7 and len({r.id for r in batch}) == 7
    assert {r.split for r in batch} == {"train"}  # never a validation or test frame
    by_sequence: dict[str, list[int]] = {}
    for record in batch:
        by_sequence.setdefault(record.group, []).append(record.frame_index)
    full = [frames for frames in by_sequence.values() if len(frames) == 3]
    assert len(full) == 2  # 3 + 3 + the 1 that completes n
    lengths = {"1": 9, "2": 5, "3": 7}
    for group, frames in by_sequence.items():
        if len(frames) == 3:  # first, middle and last frame of the sequence
            assert frames == [0, (lengths[group] - 1) // 2, lengths[group] - 1]
    # the batch is data, not a seed: the same call gives the same frames
    assert [r.id for r in warm_start.correction_batch(cvc, n=7, per_sequence=3)] == [r.id for r in batch]


def test_correction_batch_refuses_more_frames_than_the_train_split_has(cvc):
    with pytest.raises(ValueError, match="only 21 frames"):
        warm_start.correction_batch(cvc, n=22, per_sequence=30)


def test_corrected_dataset_adds_the_batch_to_train_as_corrections(tmp_path, cvc):
    kvasir = dataset(tmp_path / "kvasir", "k", {"a": (4, "train"), "b": (2, "val"), "c": (2, "test")})
    batch = warm_start.correction_batch(cvc, n=4, per_sequence=2)
    out = tmp_path / "corrected"
    warm_start.corrected_dataset(kvasir, cvc, batch, corrected_from="3", out=out)

    merged = {r.id: r for r in read_manifest(out)}
    added = [r for r in merged.values() if r.kind == "correction"]
    assert len(merged) == 8 + 4 and len(added) == 4
    assert {r.id for r in added} == {f"{corrections.ID_PREFIX}cvc-{r.id}" for r in batch}
    for record in added:
        assert record.split == "train" and record.corrected_from == "3"
        assert record.group.startswith(corrections.ID_PREFIX) and record.frame_index is None
        assert (out / record.image).is_file() and (out / record.mask).is_file()
    # Kvasir's own records keep their splits: validation and test stay Kvasir's
    assert [merged[f"kb-{i:02d}"].split for i in range(2)] == ["val", "val"]
    assert [merged[f"kc-{i:02d}"].split for i in range(2)] == ["test", "test"]
