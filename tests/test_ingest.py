"""Ingestion from a local folder: layout, metadata, kinds, splits, determinism and every bad input.

Sources are real files written to ``tmp_path``; each failure test also checks that nothing was
left behind next to ``out_dir`` (the no-half-written-dataset guarantee).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lesionflow import config
from lesionflow.config import IngestConfig
from lesionflow.data.ingest import REPORT, assign_splits, ingest
from lesionflow.data.manifest import MANIFEST, read_fingerprint, read_manifest
from lesionflow.errors import (
    AreaRatioError,
    DuplicateIdError,
    EmptySourceError,
    IngestError,
    MaskSizeMismatchError,
    MetadataError,
    OrphanMaskError,
    UnreadableImageError,
)
from lesionflow.steps.ingest import build_dataset
from tests.conftest import REPO, shared_dataset


def write_pair(root: Path, rel: str, seed: int, size=(40, 32), mask: bool = True, mode: str = "RGB",
               ext: str = ".png") -> None:
    """A random image (distinct per seed) and a blob mask at images/<rel><ext>, masks/<rel>.png."""
    rng = np.random.default_rng(seed)
    w, h = size
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / "images" / f"{rel}{ext}")
    if mask:
        m = np.zeros((h, w), np.uint8)
        m[h // 4: h // 2, w // 4: w // 2] = 255
        (root / "masks" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(root / "masks" / f"{rel}.png")


def make_source(root: Path, n: int = 8) -> Path:
    for i in range(n):
        write_pair(root, f"img_{i:02d}", seed=i)
    return root


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def cfg(src: Path, **kw) -> IngestConfig:
    return IngestConfig(source=str(src), **kw)


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    (tmp_path / "outputs").mkdir()
    return tmp_path / "outputs" / "dataset"


def test_folder_becomes_a_complete_dataset(tmp_path, out):
    src = make_source(tmp_path / "src", n=10)
    write_pair(src, "gray", seed=99, mode="L")
    Image.new("RGBA", (20, 16), (10, 20, 30, 128)).save(src / "images" / "rgba.png")
    Image.new("P", (20, 16), 3).save(src / "images" / "anim.gif")
    (src / "images" / "notes.txt").write_text("not an image: ignored")
    report = ingest(cfg(src), out)

    records = read_manifest(out)
    assert report.n_records == len(records) == 13
    assert [r.id for r in records] == sorted(r.id for r in records)
    by_id = {r.id: r for r in records}
    assert by_id["gray"].channels == 1 and np.asarray(Image.open(out / "images/gray.png")).ndim == 2
    rgba = by_id["rgba"]
    assert rgba.channels == 3 and rgba.kind == "unlabelled" and rgba.mask is None
    for r in records:
        assert sha(out / r.image) == r.image_sha256
        assert r.source == f"images/{r.id}.{'gif' if r.id == 'anim' else 'png'}"
        if r.mask:
            assert sha(out / r.mask) == r.mask_sha256
            assert set(np.unique(np.asarray(Image.open(out / r.mask)))) <= {0, 255}
    assert report.counts["split"] == read_fingerprint(out)["counts"]["split"]
    assert {r.split for r in records} == {"train", "val", "test"}
    assert json.loads((out / REPORT).read_text())["n_records"] == 13
    assert "13 records" in report.summary()
    assert listing(out.parent) == ["dataset"] + [f"dataset/{p}" for p in listing(out)]


def test_same_input_and_seed_give_identical_bytes(tmp_path):
    src = make_source(tmp_path / "src", n=20)
    a = ingest(cfg(src, split_seed=3), tmp_path / "a")
    ingest(cfg(src, split_seed=3), tmp_path / "b")
    ingest(cfg(src, split_seed=4), tmp_path / "c")
    for name in (MANIFEST, "fingerprint.json", REPORT):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert listing(tmp_path / "a") == listing(tmp_path / "b")
    assert (tmp_path / "a" / MANIFEST).read_bytes() != (tmp_path / "c" / MANIFEST).read_bytes()
    assert sum(a.counts["split"].values()) == 20 and set(a.counts["split"]) == {"train", "val", "test"}


def test_existing_empty_out_dir_is_filled(tmp_path, out):
    out.mkdir()
    ingest(cfg(make_source(tmp_path / "src", n=4)), out)
    assert len(read_manifest(out)) == 4


def test_resize_keeps_aspect_and_mask_alignment(tmp_path, out):
    src = tmp_path / "src"
    write_pair(src, "wide", seed=1, size=(100, 60))
    ingest(cfg(src, max_side=32), out)
    (r,) = read_manifest(out)
    assert (r.width, r.height) == (32, 19)
    assert Image.open(out / r.mask).size == (32, 19)


def test_folder_fields_give_lesion_type_and_group(tmp_path, out):
    src = tmp_path / "src"
    for i, t in enumerate(("benign", "malignant")):
        for p in range(4):
            for k in range(2):
                write_pair(src, f"{t}/{t}_pat{p}/{t}_{p}_{k}", seed=100 * i + 10 * p + k)
    report = ingest(cfg(src, folder_fields=["lesion_type", "group"]), out)
    records = read_manifest(out)
    assert report.counts["lesion_type"] == {"benign": 8, "malignant": 8}
    benign_groups = {r.group for r in records if r.lesion_type == "benign"}
    assert benign_groups == {f"benign_pat{p}" for p in range(4)}
    split_of_group = {}
    for r in records:
        assert split_of_group.setdefault(r.group, r.split) == r.split
        assert r.source == f"images/{r.lesion_type}/{r.group}/{r.id}.png"


def test_weak_labels_and_unlabelled(tmp_path, out):
    src = make_source(tmp_path / "src", n=2)
    write_pair(src, "weak_0", seed=10, mask=False)
    write_pair(src, "weak_1", seed=11, mask=False)
    write_pair(src, "plain", seed=12, mask=False)
    write_csv(src / "meta.csv", [
        {"id": "weak_0", "ratio": "0.25", "err": "0.05"},
        {"id": "weak_1", "ratio": "0.1", "err": ""},
        {"id": "img_00", "ratio": "0.2", "err": ""},
    ])
    ingest(cfg(src, metadata_csv="meta.csv",
               columns={"id": "id", "area_ratio": "ratio", "area_error": "err"}), out)
    by_id = {r.id: r for r in read_manifest(out)}
    weak = by_id["weak_0"]
    assert (weak.kind, weak.area_ratio, weak.area_error) == ("weak", 0.25, 0.05)
    assert by_id["weak_1"].kind == "weak" and by_id["weak_1"].area_error is None
    assert by_id["weak_0"].mask is None and not (out / "masks/weak_0.png").exists()
    assert by_id["img_00"].kind == "still" and by_id["img_00"].area_ratio == 0.2
    assert by_id["plain"].kind == "unlabelled"


def test_video_frames_with_key_frames(tmp_path, out):
    src = tmp_path / "src"
    rows = []
    for v in range(3):
        for t in range(5):
            write_pair(src, f"v{v}_f{t}", seed=100 * v + t, mask=t in (0, 3))
            frame = f"{t}.0" if v == 2 else t  # pandas writes int columns with gaps as floats
            rows.append({"id": f"v{v}_f{t}", "video": f"vid{v}", "frame": frame,
                         "key": "yes" if t == 0 else "0"})
    write_pair(src, "still_a", seed=999)
    rows.append({"id": "still_a", "video": "pat_a", "frame": "", "key": ""})
    write_csv(src / "meta.csv", rows)
    ingest(cfg(src, metadata_csv="meta.csv", columns={"id": "id", "group": "video", "frame": "frame",
                                                       "key_frame": "key"}), out)
    by_id = {r.id: r for r in read_manifest(out)}
    v1 = [by_id[f"v1_f{t}"] for t in range(5)]
    assert all(r.kind == "video_frame" and r.group == "vid1" for r in v1)
    assert [r.frame_index for r in v1] == list(range(5))
    assert [r.key_frame for r in v1] == [True, False, False, False, False]
    assert [r.mask is not None for r in v1] == [True, False, False, True, False]
    assert len({r.split for r in v1}) == 1
    assert [by_id[f"v2_f{t}"].frame_index for t in range(5)] == list(range(5))
    # one folder per video, the file where the record says
    assert {r.image.rsplit("/", 1)[0] for r in v1} == {"images/vid1"}
    assert all((out / r.image).is_file() for r in by_id.values())
    assert by_id["v1_f0"].mask == "masks/vid1/v1_f0.png" and (out / by_id["v1_f0"].mask).is_file()
    assert by_id["still_a"].image == "images/still_a.png"
    assert by_id["still_a"].kind == "still" and by_id["still_a"].frame_index is None
    assert {r.split for r in by_id.values()} == {"train", "val", "test"}


def test_identical_pixels_merge_groups(tmp_path, out):
    src = make_source(tmp_path / "src", n=12)
    # same pixels, different files and formats: a PNG copy and a lossless TIFF
    pixels = np.asarray(Image.open(src / "images/img_00.png"))
    Image.fromarray(pixels).save(src / "images/copy_tif.tif")
    Image.fromarray(pixels).save(src / "images/copy_png.png", compress_level=9)
    # constant images are identical but say nothing about a patient: not merged
    Image.new("L", (8, 8), 0).save(src / "images/black_1.png")
    Image.new("L", (8, 8), 0).save(src / "images/black_2.png")
    report = ingest(cfg(src), out)
    assert report.merged_groups == [["copy_png", "copy_tif", "img_00"]]
    by_id = {r.id: r for r in read_manifest(out)}
    assert {by_id[i].group for i in ("copy_png", "copy_tif", "img_00")} == {"copy_png"}
    assert len({by_id[i].split for i in ("copy_png", "copy_tif", "img_00")}) == 1
    assert by_id["black_1"].group != by_id["black_2"].group


FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}


def test_split_proportions_follow_the_fractions_within_each_type():
    # lesion types are not an input: the hash is uniform within each type's ids
    for seed in (0, 1):
        for lesion_type in ("benign", "malignant"):
            ids = [f"{lesion_type}-patient-{i}" for i in range(3000)]
            counts = Counter(assign_splits(ids, FRACTIONS, seed).values())
            for name, fraction in FRACTIONS.items():
                assert counts[name] / len(ids) == pytest.approx(fraction, abs=0.03)
    assert assign_splits(ids, FRACTIONS, 0) != assign_splits(ids, FRACTIONS, 1)


def test_small_datasets_still_get_every_split_moving_only_the_nearest():
    fractions = {"train": 0.9, "val": 0.05, "test": 0.05}
    tiny = assign_splits(["x", "y", "z"], fractions, seed=0)
    assert sorted(tiny.values()) == ["test", "train", "val"]
    # alone, a group has no fallback: its split is its hash's
    alone = {g: assign_splits([g], fractions, seed=0)[g] for g in tiny}
    assert sum(tiny[g] != alone[g] for g in tiny) == 3 - len(set(alone.values()))
    no_val = assign_splits([f"g{i}" for i in range(5)], {"train": 0.8, "val": 0.0, "test": 0.2},
                           seed=1)
    assert "val" not in no_val.values() and "test" in no_val.values()
    # with two groups there is nothing to fall back on: each keeps its hash's split
    assert assign_splits(["x", "y"], fractions, seed=0) == {"x": alone["x"], "y": alone["y"]}


def test_adding_a_quarter_more_groups_moves_no_existing_group():
    old = [f"patient-{i:03d}" for i in range(120)]
    before = assign_splits(old, FRACTIONS, seed=0)
    after = assign_splits(old + [f"new-{i:03d}" for i in range(30)], FRACTIONS, seed=0)
    assert {g: after[g] for g in old} == before


def test_removing_groups_moves_nothing():
    groups = [f"patient-{i:03d}" for i in range(120)]
    before = assign_splits(groups, FRACTIONS, seed=0)
    kept = groups[::3]
    assert assign_splits(kept, FRACTIONS, seed=0) == {g: before[g] for g in kept}


def test_reingesting_with_extra_images_keeps_every_old_split(tmp_path):
    src = tmp_path / "src"
    rows = []
    for i in range(40):
        write_pair(src, f"img_{i:02d}", seed=i)
        rows.append({"id": f"img_{i:02d}", "patient": f"p{i % 12:02d}"})
    write_csv(src / "meta.csv", rows)
    settings = {"metadata_csv": "meta.csv", "columns": {"id": "id", "group": "patient"}}
    ingest(cfg(src, **settings), tmp_path / "v1")
    before = {r.id: r.split for r in read_manifest(tmp_path / "v1")}

    for i in range(40, 60):  # more images of old patients, and new patients
        write_pair(src, f"img_{i:02d}", seed=i)
        rows.append({"id": f"img_{i:02d}", "patient": f"p{i % 18:02d}"})
    write_csv(src / "meta.csv", rows)
    ingest(cfg(src, **settings), tmp_path / "v2")
    after = read_manifest(tmp_path / "v2")
    assert len(after) == 60
    assert {r.id: r.split for r in after if r.id in before} == before
    split_of = {r.group: r.split for r in after}
    assert all(r.split == split_of[r.group] for r in after)


def built(tmp_path: Path, *sets: str) -> list:
    """The records ``build_dataset`` (what the ingest step runs) makes from params.yaml + ``sets``."""
    out = tmp_path / "-".join(sets)
    build_dataset(config.load(REPO / "params.yaml", [f"runtime.workdir={tmp_path / 'work'}", *sets]), out)
    return read_manifest(out)


def test_the_split_follows_split_seed_and_not_the_training_seed(tmp_path):
    """Comparing training seeds must not move the test split: the ingest step keys the split hash
    with ``ingest.split_seed`` alone."""
    src = make_source(tmp_path / "src", n=30)

    def splits(*sets: str) -> dict[str, str]:
        return {r.id: r.split for r in built(tmp_path, f"ingest.source={src}", *sets)}

    fixed = splits("seed=0")
    assert splits("seed=1") == fixed
    assert splits("seed=1", "ingest.split_seed=1") != fixed


def test_synthetic_data_follows_synthetic_seed_and_not_the_training_seed(tmp_path):
    """The quick start's seeds are compared on one dataset: ``synthetic.seed`` draws the data."""
    def pixels(*sets: str) -> list[tuple[str, str, str, str | None]]:
        return [(r.id, r.split, r.image_sha256, r.mask_sha256) for r in built(
            tmp_path, "ingest.source=synthetic", "synthetic.n_images=8", "synthetic.n_videos=1",
            "synthetic.n_weak=2", *sets)]

    fixed = pixels("seed=0")
    assert pixels("seed=1") == fixed
    assert pixels("seed=1", "synthetic.seed=1") != fixed


def test_cvc_clinicdb_sequences_stay_whole_and_every_split_is_filled(tmp_path):
    src = shared_dataset("cvc-clinicdb")
    params = config.load([REPO / "params.yaml", REPO / "configs/cvc-clinicdb.yaml"],
                         overrides=[f"ingest.source={src}", "ingest.max_side=32"])
    ingest(params.ingest, tmp_path / "cvc")
    records = read_manifest(tmp_path / "cvc")
    with open(src / "sequences.csv", newline="") as f:
        sequence_of = {row["frame"]: row["sequence"] for row in csv.DictReader(f)}
    splits_of_sequence = defaultdict(set)
    for r in records:
        splits_of_sequence[sequence_of[r.id]].add(r.split)
    assert len(records) == len(sequence_of) and len(splits_of_sequence) == 29
    assert all(len(splits) == 1 for splits in splits_of_sequence.values())
    assert {r.split for r in records} == {"train", "val", "test"}


# --- bad input: raise mode names the file and leaves nothing behind --------------------------------


def _bad_unreadable_image(src):
    (src / "images/broken.png").write_bytes(b"this is not a png")
    return UnreadableImageError, ["broken.png"], {}


def _bad_unreadable_mask(src):
    write_pair(src, "img_x", seed=50)
    (src / "masks/img_x.png").write_bytes(b"\x89PNG truncated")
    return UnreadableImageError, ["img_x.png"], {}


def _bad_mask_size(src):
    write_pair(src, "odd", seed=51)
    Image.new("L", (10, 10), 255).save(src / "masks/odd.png")
    return MaskSizeMismatchError, ["odd.png", "10x10"], {}


def _bad_orphan_mask(src):
    Image.new("L", (10, 10), 255).save(src / "masks/ghost.png")
    return OrphanMaskError, ["ghost.png"], {}


def _bad_duplicate_id(src):
    write_pair(src, "a/twin", seed=52)
    write_pair(src, "b/twin", seed=53, ext=".jpg")
    return DuplicateIdError, ["a/twin.png", "b/twin.jpg"], {}


def _bad_area_ratio(src):
    write_pair(src, "weak", seed=54, mask=False)
    write_csv(src / "meta.csv", [{"id": "weak", "ratio": "1.5"}])
    return AreaRatioError, ["weak", "1.5"], {"metadata_csv": "meta.csv",
                                             "columns": {"area_ratio": "ratio"}}


def _bad_missing_column(src):
    write_csv(src / "meta.csv", [{"id": "img_00", "kind": "x"}])
    return MetadataError, ["'lesion'", "meta.csv"], {"metadata_csv": "meta.csv",
                                                     "columns": {"lesion_type": "lesion"}}


def _bad_unknown_ids(src):
    write_csv(src / "meta.csv", [{"id": "img_00", "t": "a"}, {"id": "nobody", "t": "b"}])
    return MetadataError, ["nobody", "meta.csv"], {"metadata_csv": "meta.csv",
                                                   "columns": {"lesion_type": "t"}}


BAD_INPUTS = [_bad_unreadable_image, _bad_unreadable_mask, _bad_mask_size, _bad_orphan_mask,
              _bad_duplicate_id, _bad_area_ratio, _bad_missing_column, _bad_unknown_ids]


@pytest.mark.parametrize("make_bad", BAD_INPUTS, ids=lambda f: f.__name__[5:])
@pytest.mark.parametrize("out_exists", [False, True], ids=["absent", "empty"])
def test_bad_input_raises_naming_it_and_writes_nothing(tmp_path, out, make_bad, out_exists):
    src = make_source(tmp_path / "src", n=4)
    error, names, extra = make_bad(src)
    if out_exists:
        out.mkdir()
    before = listing(out.parent)
    with pytest.raises(error) as info:
        ingest(cfg(src, **extra), out)
    for name in names:
        assert name in str(info.value)
    assert listing(out.parent) == before


def test_empty_source_raises(tmp_path, out):
    (tmp_path / "src/images").mkdir(parents=True)
    (tmp_path / "src/images/notes.txt").write_text("no images here")
    for on_error in ("raise", "skip"):
        with pytest.raises(EmptySourceError, match="src"):
            ingest(cfg(tmp_path / "src", on_error=on_error), out)
    with pytest.raises(EmptySourceError, match="missing"):
        ingest(cfg(tmp_path / "missing"), out)
    assert listing(out.parent) == []


def test_non_empty_out_dir_is_refused(tmp_path, out):
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(IngestError, match="dataset"):
        ingest(cfg(make_source(tmp_path / "src", n=3)), out)
    assert listing(out.parent) == ["dataset", "dataset/keep.txt"]


def test_skip_mode_reports_and_leaves_out_bad_records(tmp_path, out):
    src = make_source(tmp_path / "src", n=6)
    for make_bad in (_bad_unreadable_image, _bad_unreadable_mask, _bad_mask_size, _bad_orphan_mask,
                     _bad_duplicate_id):
        make_bad(src)
    write_pair(src, "weak", seed=54, mask=False)
    write_csv(src / "meta.csv", [{"id": "weak", "ratio": "-0.1"}])
    report = ingest(cfg(src, on_error="skip", metadata_csv="meta.csv", columns={"area_ratio": "ratio"}),
                    out)
    skipped = {s["path"]: s["reason"].split(":")[0] for s in report.skipped}
    assert skipped == {
        "images/broken.png": "UnreadableImageError",
        "images/img_x.png": "UnreadableImageError",
        "images/odd.png": "MaskSizeMismatchError",
        "masks/ghost.png": "OrphanMaskError",
        "images/b/twin.jpg": "DuplicateIdError",
        "images/weak.png": "AreaRatioError",
    }
    ids = {r.id for r in read_manifest(out)}
    assert ids == {f"img_{i:02d}" for i in range(6)} | {"twin"}
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{i}.png" for i in ids)
    assert "skipped 6 files" in report.summary()
    assert json.loads((out / REPORT).read_text())["skipped"] == report.skipped


def test_masks_next_to_images_with_suffix(tmp_path, out):
    src = tmp_path / "src"
    for i in range(3):
        write_pair(src, f"case{i}", seed=i)
        (src / "masks" / f"case{i}.png").rename(src / "images" / f"case{i}_mask.png")
    report = ingest(cfg(src, masks_dir="images", mask_suffix="_mask"), out)
    assert report.counts["kind"] == {"still": 3}
    assert {r.id for r in read_manifest(out)} == {"case0", "case1", "case2"}
    with pytest.raises(IngestError, match="mask_suffix"):
        ingest(cfg(src, masks_dir="images"), out.parent / "other")
