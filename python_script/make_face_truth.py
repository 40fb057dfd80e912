"""Build stage 03's face truth set from ../shared/testdata: the source frames, whose faces
were boxed by hand in ``sources.json``, and harder frames derived from them.

    uv run python python_script/make_face_truth.py           # writes the JPEGs and truth.json
    uv run python python_script/make_face_truth.py --draw DIR  # every frame with its boxes drawn

Where the files go: ``test/stages/characters/data/face_truth/`` (a few dozen small JPEGs and
``truth.json``; committed, so the evaluation and the tests need no testdata). The source boxes are
the hand-checked ones; a derived frame's boxes are computed from its source's by the same
transform (``"boxes": "derived"`` in the JSON), never re-detected:

* ``rot``: rotated in plane about the frame's centre (black corners). A box becomes the bounding
  box of the face's ellipse turned by the angle (what a detector draws round a tilted face;
  the corners of a turned box would overstate it by up to 40%).
* ``small``: the frame shrunk so its largest face is 24-40 px tall, twice (as it is and mirrored)
  on a dark canvas of 640x360 (a wide shot).
* ``dark``: exposure cut to a quarter with a gamma of 1.4, plus sensor-like noise (night scenes).
* ``mirror``: flipped left to right.
* ``cut``: a tighter framing (a part of the frame enlarged to 640 px wide) whose edge cuts a
  face; a face with less than half of it left inside is ignored.
* ``crop``: a part of the frame enlarged to 640 px wide (profile close-ups, faces looking down).
* ``noface``: a part of a frame with no face in it (curtains, hands, a backdrop with logos),
  enlarged to 640 px wide.

Why derived frames: the testdata holds a few dozen faces, most of them frontal and large; films
are full of tilted, small, dark and half-visible ones, and these make the detectors meet them
without inventing faces nobody checked.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT.parent / "shared" / "testdata" / "face_recognition_examples"
OUT = ROOT / "test" / "stages" / "characters" / "data" / "face_truth"
CANVAS = (640, 360)
JPEG_QUALITY = 82

# (name, source, transform, parameters): the derived frames, in the order they are written.
DERIVED: list[tuple[str, str, str, dict]] = [
    ("rot_p25_hamilton_f150", "hamilton_f150", "rot", {"angle": 25}),
    ("rot_m35_hamilton_f090", "hamilton_f090", "rot", {"angle": -35}),
    ("rot_p30_two_people", "two_people", "rot", {"angle": 30}),
    ("rot_m20_hamilton_f225", "hamilton_f225", "rot", {"angle": -20}),
    ("rot_p45_alex_lacamoire1", "alex_lacamoire1", "rot", {"angle": 45}),
    ("small24_hamilton_f150", "hamilton_f150", "small", {"face": 24}),
    ("small28_hamilton_f225", "hamilton_f225", "small", {"face": 28}),
    ("small32_two_people", "two_people", "small", {"face": 32}),
    ("small36_kit_with_rose", "kit_with_rose", "small", {"face": 36}),
    ("small40_obama_and_biden", "obama_and_biden", "small", {"face": 40}),
    ("small30_johnsnow_test1", "johnsnow_test1", "small", {"face": 30}),
    ("dark_hamilton_f225", "hamilton_f225", "dark", {}),
    ("dark_hamilton_f090", "hamilton_f090", "dark", {}),
    ("dark_kit_with_rose", "kit_with_rose", "dark", {}),
    ("mirror_hamilton_f225", "hamilton_f225", "mirror", {}),
    ("mirror_hamilton_f030", "hamilton_f030", "mirror", {}),
    ("mirror_obama_and_biden", "obama_and_biden", "mirror", {}),
    ("cut_left_hamilton_f150", "hamilton_f150", "cut", {"box": [250, 0, 570, 180]}),
    ("cut_left_two_people", "two_people", "cut", {"box": [165, 0, 565, 225]}),
    ("cut_top_alex_lacamoire1", "alex_lacamoire1", "cut", {"box": [150, 95, 470, 275]}),
    ("cut_right_hamilton_f200", "hamilton_f200", "cut", {"box": [0, 0, 315, 177]}),
    ("crop_profile_hamilton_f030", "hamilton_f030", "crop", {"box": [200, 40, 600, 265]}),
    (
        "crop_profile_mirror_hamilton_f045",
        "hamilton_f045",
        "crop",
        {"box": [300, 60, 640, 251], "mirror": True},
    ),
    ("crop_down_obama_and_biden", "obama_and_biden", "crop", {"box": [440, 300, 640, 412]}),
    ("crop_down_hamilton_f225", "hamilton_f225", "crop", {"box": [100, 40, 300, 152]}),
    ("small40_profile_hamilton_f030", "hamilton_f030", "small", {"face": 40}),
    ("noface_curtain_hamilton_f150", "hamilton_f150", "noface", {"box": [300, 140, 640, 331]}),
    ("noface_stage_hamilton_f000", "hamilton_f000", "noface", {"box": [100, 230, 640, 360]}),
    ("noface_backdrop_kit_with_rose", "kit_with_rose", "noface", {"box": [300, 0, 458, 60]}),
    ("noface_hands_obama_and_biden", "obama_and_biden", "noface", {"box": [0, 0, 200, 130]}),
]


def read_source(src: dict) -> np.ndarray:
    """The source frame as BGR, at the size its boxes are in."""
    if "video" in src:
        import av

        with av.open(str(EXAMPLES / src["video"])) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index == src["frame"]:
                    return frame.to_ndarray(format="bgr24")
        raise SystemExit(f"{src['video']} has no frame {src['frame']}")
    bgr = cv2.imread(str(EXAMPLES / src["photo"]), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"cannot read {EXAMPLES / src['photo']}")
    scale = 640 / max(bgr.shape[:2])
    if scale < 1:
        bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return bgr


def clip_box(box: list[float], width: int, height: int) -> tuple[list[int] | None, float]:
    """A box clipped to the frame and the share of it inside (None when nothing is)."""
    left, top, right, bottom = box
    area = max(0.0, right - left) * max(0.0, bottom - top)
    c = [max(0.0, left), max(0.0, top), min(float(width), right), min(float(height), bottom)]
    inside = max(0.0, c[2] - c[0]) * max(0.0, c[3] - c[1])
    if area <= 0 or inside <= 0.02 * area:
        return None, 0.0
    return [round(v) for v in c], inside / area


def _map_faces(faces: list[dict], fn, width: int, height: int) -> list[dict]:
    """Faces through a box transform; a face that the frame's edge leaves less than half of is
    ignored (a sliver nobody should have to find, nor be blamed for finding)."""
    out = []
    for face in faces:
        box, share = clip_box(fn(face["box"]), width, height)
        if box is not None:
            out.append({**face, "box": box, **({"ignore": True} if share < 0.5 else {})})
    return out


def derive(bgr: np.ndarray, faces: list[dict], kind: str, p: dict) -> tuple[np.ndarray, list[dict]]:
    """One derived frame and its faces (boxes computed by the frame's own transform)."""
    h, w = bgr.shape[:2]
    if kind == "rot":
        angle = float(p["angle"])
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        out = cv2.warpAffine(bgr, m, (w, h), flags=cv2.INTER_CUBIC, borderValue=(0, 0, 0))
        theta = math.radians(angle)

        def fn(b):
            cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
            x, y = m @ np.array([cx, cy, 1.0])
            a, c = (b[2] - b[0]) / 2, (b[3] - b[1]) / 2
            hw = math.sqrt((a * math.cos(theta)) ** 2 + (c * math.sin(theta)) ** 2)
            hh = math.sqrt((a * math.sin(theta)) ** 2 + (c * math.cos(theta)) ** 2)
            return [x - hw, y - hh, x + hw, y + hh]

        return out, _map_faces(faces, fn, w, h)
    if kind == "small":
        # The shrunk frame and its mirror image side by side on a dark canvas (a wide shot with
        # small faces); faces of a copy the canvas cuts are boxed to its edge.
        tallest = max(f["box"][3] - f["box"][1] for f in faces if not f.get("ignore"))
        s = p["face"] / tallest
        small = cv2.resize(bgr, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        cw, ch = CANVAS
        sh, sw = small.shape[:2]
        out = np.full((ch, cw, 3), 16, np.uint8)
        y0 = (ch - sh) // 2
        mapped: list[dict] = []
        for x0, flip in (((cw - 2 * sw) // 2, False), ((cw - 2 * sw) // 2 + sw, True)):
            tile = small[:, ::-1] if flip else small
            ys, xs = max(0, -y0), max(0, -x0)
            ye, xe = min(sh, ch - y0), min(sw, cw - x0)
            out[y0 + ys : y0 + ye, x0 + xs : x0 + xe] = tile[ys:ye, xs:xe]

            def fn(b, x0=x0, flip=flip):
                left, right = (sw - b[2] * s, sw - b[0] * s) if flip else (b[0] * s, b[2] * s)
                return [left + x0, b[1] * s + y0, right + x0, b[3] * s + y0]

            mapped += _map_faces(faces, fn, cw, ch)
        return out, mapped
    if kind == "dark":
        rng = np.random.default_rng(30)
        f = (bgr.astype(np.float32) / 255.0) ** 1.4 * 0.25
        f = f + rng.normal(0, 0.012, f.shape).astype(np.float32)
        out = np.clip(f * 255.0, 0, 255).astype(np.uint8)
        return out, [dict(face) for face in faces]
    if kind == "mirror":
        return bgr[:, ::-1].copy(), _map_faces(faces, lambda b: [w - b[2], b[1], w - b[0], b[3]], w, h)
    if kind in ("crop", "cut", "noface"):
        x0, y0, x1, y1 = p["box"]
        part = bgr[y0:y1, x0:x1]
        s = CANVAS[0] / part.shape[1]
        out = cv2.resize(part, None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC) if s != 1 else part.copy()
        oh, ow = out.shape[:2]

        def fn(b):
            return [(b[0] - x0) * s, (b[1] - y0) * s, (b[2] - x0) * s, (b[3] - y0) * s]

        mapped = _map_faces(faces, fn, ow, oh)
        if p.get("mirror"):
            out = out[:, ::-1].copy()
            mapped = [
                {**f, "box": [ow - f["box"][2], f["box"][1], ow - f["box"][0], f["box"][3]]} for f in mapped
            ]
        if kind == "noface" and any(not f.get("ignore") for f in mapped):
            raise SystemExit(f"noface crop {p['box']} holds a face: {mapped}")
        return out, [] if kind == "noface" else mapped
    raise ValueError(kind)


def build(out_dir: Path) -> dict:
    """Write every frame and return the truth document."""
    spec = json.loads((out_dir / "sources.json").read_text())
    sources = {s["name"]: s for s in spec["sources"]}
    images: dict[str, np.ndarray] = {}
    frames = []
    for name, src in sources.items():
        bgr = read_source(src)
        images[name] = bgr
        origin = f"{src['video']} frame {src['frame']}" if "video" in src else src["photo"]
        frames.append(_entry(out_dir, name, bgr, src["faces"], "source", origin, None))
    for name, src_name, kind, params in DERIVED:
        bgr, faces = derive(images[src_name], sources[src_name]["faces"], kind, params)
        frames.append(_entry(out_dir, name, bgr, faces, kind, src_name, params))
    return {
        "about": (
            "Stage 03's face truth set. 'source' frames: boxes checked by eye (sources.json); "
            "derived frames: boxes computed from the source's by the same transform "
            "(python_script/make_face_truth.py says how). Boxes are [left, top, right, bottom] in the "
            "frame's pixels. A match needs IoU >= 0.4; 'ignore' faces are neither required nor false "
            "positives."
        ),
        "iou": 0.4,
        "frames": frames,
    }


def _entry(out_dir: Path, name: str, bgr: np.ndarray, faces: list[dict], kind: str, origin: str, params):
    path = out_dir / f"{name}.jpg"
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    path.write_bytes(data.tobytes())
    return {
        "file": path.name,
        "width": int(bgr.shape[1]),
        "height": int(bgr.shape[0]),
        "kind": kind,
        "from": origin,
        "params": params,
        "boxes": "checked by eye" if kind == "source" else "derived",
        "faces": [
            {
                "box": [int(v) for v in f["box"]],
                "pose": f["pose"],
                **({"ignore": True} if f.get("ignore") else {}),
                # Cut by the frame's edge (boxed to the edge).
                **({"cut": True} if _touches_edge(f["box"], bgr.shape) else {}),
            }
            for f in faces
        ],
    }


def _touches_edge(box: list[int], shape: tuple[int, ...]) -> bool:
    return box[0] <= 0 or box[1] <= 0 or box[2] >= shape[1] or box[3] >= shape[0]


def draw(truth: dict, folder: Path, dest: Path) -> None:
    """Each frame with its boxes (green: counted, grey: ignored) and a 50-px grid, for checking."""
    dest.mkdir(parents=True, exist_ok=True)
    for frame in truth["frames"]:
        bgr = cv2.imread(str(folder / frame["file"]))
        for x in range(0, bgr.shape[1], 50):
            cv2.line(bgr, (x, 0), (x, 6), (0, 255, 255), 1)
        for y in range(0, bgr.shape[0], 50):
            cv2.line(bgr, (0, y), (6, y), (0, 255, 255), 1)
        for face in frame["faces"]:
            left, t, r, b = face["box"]
            colour = (128, 128, 128) if face.get("ignore") else (0, 255, 0)
            cv2.rectangle(bgr, (left, t), (r - 1, b - 1), colour, 1)
            label = face["pose"][:5]
            cv2.putText(bgr, label, (left, max(10, t - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.35, colour, 1)
        cv2.imwrite(str(dest / frame["file"].replace(".jpg", ".png")), bgr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draw", type=Path, help="also write every frame with its boxes drawn into DIR")
    args = parser.parse_args(argv)
    if not EXAMPLES.is_dir():
        print(f"the testdata is not here: {EXAMPLES}", file=sys.stderr)
        return 2
    truth = build(OUT)
    (OUT / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    faces = sum(1 for f in truth["frames"] for face in f["faces"] if not face.get("ignore"))
    size = sum(p.stat().st_size for p in OUT.glob("*.jpg"))
    print(f"{len(truth['frames'])} frames, {faces} faces counted, {size / 1e6:.2f} MB of JPEG in {OUT}")
    if args.draw:
        draw(truth, OUT, args.draw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
