"""Video synthesis: θ and every loss on hand-built tensors, key frames, clip orders, the stop
conditions, rollouts, and the synthesize_video step on a tiny synthetic dataset with moving lesions."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from lesionflow import config, tracking
from lesionflow.data.manifest import read_manifest, write_manifest
from lesionflow.errors import ConfigError, FrameShapeError, KeyFrameError
from lesionflow.steps.ingest import build_dataset
from lesionflow.steps.synthesize_video import synthesize_video
from lesionflow.video.keyframes import choose_key_frame, key_frame_scores
from lesionflow.video.losses import phi, similarity, theta
from lesionflow.video.model import NextFrameModel
from lesionflow.video.synthesis import propagate_masks, rollout, select_frames
from lesionflow.video.train import Video, clip_indices, train_next_frame

G1, G2 = 0.5, 0.3


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine they oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def square(size: int = 16, top: int = 4, left: int = 4, side: int = 6) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    m[..., top:top + side, left:left + side] = 1
    return m


def textured(seed: int, size: int = 16) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- φ, d and θ on hand-built tensors -------------------------------------------------------

def test_phi_is_a_distance_zero_for_identical_inputs():
    a, b = square(), square(left=7)  # 6x6 squares overlapping in a 6x3 strip
    for kind in ("l1", "l2", "dice"):
        assert phi(a, a, kind).item() == pytest.approx(0, abs=1e-6)
    # 18 of 36 pixels differ on each side: 36 differing pixels of 256
    assert phi(a, b, "l1").item() == pytest.approx(36 / 256)
    assert phi(0.5 * a, a, "l2").item() == pytest.approx(0.25 * 36 / 256)
    assert phi(a, b, "dice").item() == pytest.approx(1 - 2 * 18 / 72, abs=1e-6)
    assert phi(a, square(left=10, top=10), "dice").item() == pytest.approx(1.0, abs=1e-6)  # disjoint
    assert phi(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), "dice").item() == pytest.approx(0)


def test_similarity_is_one_for_identical_frames_and_lower_for_different_ones():
    a, b = textured(0), textured(1)
    near = (a + 0.02 * (textured(2) - 0.5)).clamp(0, 1)
    for kind in ("ssim", "l1"):
        same, close, far = (similarity(a, x, kind).item() for x in (a, near, b))
        assert same == pytest.approx(1.0, abs=1e-5)
        assert same > close > far
    assert similarity(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.25), "l1").item() == pytest.approx(0.75)


def test_theta_uses_phi_for_similar_frames_and_a_margin_hinge_for_dissimilar_ones():
    distance = torch.tensor([0.2, 0.2, 0.5, 0.0])
    d = torch.tensor([0.9, 0.1, 0.1, 0.5])  # similar, dissimilar, dissimilar past margin, at γ1
    assert theta(distance, d, gamma1=G1, gamma2=G2).tolist() == pytest.approx([0.2, 0.1, 0.0, 0.0])


def test_mask_losses_on_similar_and_dissimilar_frames():
    """L_M = θ(φ_dice(M_a, M_b), d(I_a, I_b)): same mask on similar frames costs nothing, the same
    mask on dissimilar frames costs the full margin, clearly different masks on them nothing."""
    frame, other = textured(0), textured(5)
    d_similar, d_dissimilar = similarity(frame, frame, "ssim"), similarity(frame, other, "ssim")
    assert d_similar.item() >= G1 > d_dissimilar.item()
    m, moved = square(), square(left=10, top=10)

    def loss(a, b, d):
        return theta(phi(a, b, "dice"), d, gamma1=G1, gamma2=G2).item()

    assert loss(m, m, d_similar) == pytest.approx(0, abs=1e-6)
    assert loss(m, moved, d_similar) == pytest.approx(1, abs=1e-6)
    assert loss(m, m, d_dissimilar) == pytest.approx(G2, abs=1e-6)
    assert loss(m, moved, d_dissimilar) == 0


def test_losses_refuse_mismatched_shapes():
    with pytest.raises(FrameShapeError, match="differ"):
        phi(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4), "l1")
    with pytest.raises(FrameShapeError, match="differ"):
        theta(torch.zeros(2), torch.zeros(3), gamma1=G1, gamma2=G2)
    with pytest.raises(FrameShapeError, match="multiples"):
        NextFrameModel("shared", 4, 2)(torch.zeros(1, 3, 10, 10), torch.zeros(1, 1, 10, 10))


# --- model, key frames, clips ---------------------------------------------------------------

@pytest.mark.parametrize("architecture", ["shared", "separate"])
def test_both_architectures_train_both_outputs(architecture):
    g = NextFrameModel(architecture, base_channels=4, depth=2)
    image, logits = g(torch.rand(2, 3, 16, 16), torch.rand(2, 1, 16, 16))
    assert image.shape == (2, 3, 16, 16) and logits.shape == (2, 1, 16, 16)
    (image.mean() + logits.mean()).backward()
    assert g.image_decoder.head.weight.grad.abs().sum() > 0
    assert g.mask_decoder.head.weight.grad.abs().sum() > 0
    assert (g.mask_encoder is None) == (architecture == "shared")


def test_mask_network_can_see_the_next_frame():
    g = NextFrameModel("separate", base_channels=4, depth=2, mask_sees_next=True).eval()
    image, mask = textured(0), square()
    with torch.no_grad():
        _, a = g(image, mask, textured(1))
        _, b = g(image, mask, textured(2))
        own_image, own = g(image, mask)
        _, via_own = g(image, mask, own_image.clamp(0, 1))
    assert not torch.allclose(a, b)  # the mask depends on the next frame it is shown
    assert torch.allclose(own, via_own)  # synthesis: G's own next image stands in for it
    with pytest.raises(ValueError, match="separate"):
        NextFrameModel("shared", 4, 2, mask_sees_next=True)
    with pytest.raises(ConfigError, match="separate"):
        config.load(None, ["video.mask_sees_next=true"])


def test_key_frame_prefers_sharp_central_well_exposed_labelled_frames():
    frames = np.full((4, 3, 16, 16), 0.5, np.float32)
    frames[1, :, ::2], frames[1, :, 1::2] = 0.8, 0.2  # sharp stripes, still mid-grey on average
    masks = np.zeros((4, 1, 16, 16), np.float32)
    masks[:, :, 6:10, 6:10] = 1  # central everywhere...
    masks[2, :, :4, :4], masks[2, :, 6:10, 6:10] = 1, 0  # ...except frame 2: in a corner
    known = np.array([True, True, True, False])
    assert choose_key_frame(frames, masks, known) == 1
    scores = key_frame_scores(frames, masks, known, sharpness_weight=0.0)
    assert scores[2] < scores[0] and scores[3] == -np.inf  # corner lesion loses; no mask, no key
    with pytest.raises(KeyFrameError):
        choose_key_frame(frames, masks, np.zeros(4, bool))


def _video(n: int, key: int) -> Video:
    return Video("v", [], np.zeros((n, 3, 8, 8), np.float32), np.zeros((n, 1, 8, 8), np.float32),
                 np.ones(n, bool), key)


def test_clip_orders():
    rng = np.random.default_rng(0)
    v = _video(10, key=6)
    forward = clip_indices(v, "forward", 4, rng)
    assert len(forward) == 4 and np.all(np.diff(forward) == 1)
    assert np.all(np.diff(clip_indices(v, "backward", 4, rng)) == -1)
    centred = [clip_indices(v, "key_centred", 4, rng) for _ in range(20)]
    assert all(c[0] == 6 for c in centred)
    assert {c[1] for c in centred} == {5, 7}  # both directions away from the key frame
    assert {np.sign(np.diff(clip_indices(v, "fused", 3, rng))[0]) for _ in range(20)} == {-1, 1}
    assert clip_indices(_video(10, key=9), "key_centred", 4, rng) == [9, 8, 7, 6]


def test_video_config_fails_loudly():
    with pytest.raises(ConfigError, match="video.image_size 60 must be a multiple of 8 .*set video.image_size to 56 or 64"):
        config.load(None, ["video.image_size=60", "video.depth=3"])
    with pytest.raises(ConfigError, match="video.mask_phi"):
        config.load(None, ["video.mask_phi=ssim"])


# --- rollouts and frame selection -----------------------------------------------------------

def test_frame_selection_every_k_dissimilar_similar():
    still = textured(0).expand(5, 3, 16, 16)
    assert select_frames(still, "every_k", every_k=2) == [2, 4]
    assert select_frames(still, "dissimilar", threshold=0.9) == []  # nothing new happens
    assert select_frames(still, "similar", threshold=0.9) == [1, 2, 3, 4]
    varied = torch.cat([textured(i) for i in range(5)])
    assert select_frames(varied, "dissimilar", threshold=0.9) == [1, 2, 3, 4]


def test_rollout_feeds_own_outputs_and_propagation_keeps_the_key_mask():
    g = NextFrameModel("shared", base_channels=4, depth=1).eval()
    images, masks = rollout(g, textured(0), square(), n_steps=3)
    assert images.shape == (4, 1, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(masks[0], square()) and 0 <= masks.min() and masks.max() <= 1
    with torch.no_grad():
        step1, _ = g(textured(0), square())
    assert torch.allclose(images[1], step1.clamp(0, 1))
    frames = torch.cat([textured(i) for i in range(5)]).numpy()
    probs = propagate_masks(g, frames, square()[0].numpy(), key=2)
    assert probs.shape == (5, 1, 16, 16) and np.array_equal(probs[2], square()[0].numpy())


# --- training and the step ------------------------------------------------------------------

TINY = ["synthetic.n_images=12", "synthetic.n_videos=4", "synthetic.frames_per_video=6",
        "synthetic.size=32", "video.image_size=32", "video.base_channels=4", "video.depth=2",
        "video.batch_size=2", "video.clip_length=3", "ingest.split.train=0.5",
        "ingest.split.val=0.25", "ingest.split.test=0.25"]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    params = config.load(None, TINY)
    out = tmp_path_factory.mktemp("video") / "dataset"
    build_dataset(params, out)
    return params, out


def test_training_lowers_the_loss_and_obeys_stop_conditions(tiny_dataset):
    from lesionflow.video.train import load_video, video_groups

    params, data = tiny_dataset
    videos = [load_video(data, n, fr, params.video) for n, fr in video_groups(read_manifest(data)).items()]
    assert videos and all(len(v.frames) == 6 for v in videos)
    cfg = params.video.model_copy(update={"max_steps": 30})
    _, result = train_next_frame(videos, cfg, seed=0)
    first, last = (np.mean([r["total"] for r in rows]) for rows in (result.history[:5], result.history[-5:]))
    assert result.steps == 30 and last < first
    _, early = train_next_frame(videos, cfg.model_copy(update={"loss_threshold": 100.0}), seed=0)
    assert early.steps == 1 and "loss_threshold" in early.stop_reason
    # a model that cannot learn (lr ~ 0) only sees batch noise: no new best within 2 steps soon
    _, patient = train_next_frame(videos, cfg.model_copy(update={"patience": 2, "lr": 1e-12}), seed=0)
    assert patient.steps < 30 and "patience" in patient.stop_reason
    with pytest.raises(KeyFrameError):
        train_next_frame([], cfg, seed=0)


def test_optional_discriminator_adds_an_adversarial_term(tiny_dataset):
    from lesionflow.video.train import load_video, video_groups

    params, data = tiny_dataset
    videos = [load_video(data, n, fr, params.video) for n, fr in video_groups(read_manifest(data)).items()]
    cfg = params.video.model_copy(update={"max_steps": 3, "gan_weight": 0.1})
    _, result = train_next_frame(videos, cfg, seed=0)
    assert all(row["gan"] > 0 for row in result.history)
    _, plain = train_next_frame(videos, cfg.model_copy(update={"gan_weight": 0.0}), seed=0)
    assert all(row["gan"] == 0 for row in plain.history)


def test_step_propagates_key_masks_and_adds_synthetic_videos(tiny_dataset, tmp_path):
    params, data = tiny_dataset
    params = config.load(None, TINY + ["video.max_steps=5", "video.mix_ratio=0.5", "video.n_rollouts_logged=1"])
    records = read_manifest(data)
    # hide every train-video mask but the key frame's: the frames propagation must label
    hidden = {r.id for r in records if r.kind == "video_frame" and r.split == "train" and not r.key_frame}
    assert hidden
    write_manifest(data, [r.model_copy(update={"mask": None, "mask_sha256": None}) if r.id in hidden else r
                          for r in records])
    tracking.connect(config.load(None, [f"runtime.workdir={tmp_path}"]))  # a fresh store + experiment
    with mlflow.start_run() as run:
        report = synthesize_video(params, data, tmp_path / "out")
    out = read_manifest(tmp_path / "out")
    propagated = [r for r in out if r.id in hidden]
    assert report.counts["propagated"] == len(hidden)
    assert all(r.kind == "pseudo_label" and (tmp_path / "out" / r.mask).is_file() for r in propagated)
    real_train = [r for r in read_manifest(data) if r.split == "train" and r.mask is not None]
    synthetic = [r for r in out if r.kind == "synthetic_video"]
    assert len(synthetic) == report.counts["synthetic"] == round(0.5 * len(real_train))
    assert all(r.split == "train" and r.image.startswith("images/synthetic_video/") for r in synthetic)
    assert all((tmp_path / "out" / r.image).is_file() and (tmp_path / "out" / r.mask).is_file()
               for r in synthetic)
    untouched = {r.id: r for r in read_manifest(data) if r.split != "train"}
    assert all(untouched[r.id] == r for r in out if r.split != "train")
    client = mlflow.tracking.MlflowClient()
    assert {"loss_image", "loss_mask1", "loss_mask2"} <= set(client.get_run(run.info.run_id).data.metrics)
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "rollouts")}
    assert any(p.endswith(".gif") for p in logged) and any(p.endswith(".png") for p in logged)


def test_step_passes_the_dataset_through_when_disabled(tiny_dataset, tmp_path):
    _, data = tiny_dataset
    params = config.load(None, TINY + ["video.enabled=false"])
    tracking.connect(config.load(None, [f"runtime.workdir={tmp_path}"]))  # a fresh store + experiment
    with mlflow.start_run():
        report = synthesize_video(params, data, tmp_path / "out")
    assert "passed through" in report.message
    assert read_manifest(tmp_path / "out") == read_manifest(data)
