"""A short "film as released", made from real footage, with its truth known by construction.

Clean clips hide how a film is really released. A film as it is released breaks a dataset
in ways a clean clip never shows, so this builds one from the only real footage the project may
use (``../shared/testdata``: the Hamilton clip and the knn photos) the way releases are made:

* the picture is letterboxed (2.40:1 inside 16:9, so black bars above and below every frame);
* it opens with a title card on black and one on a coloured background, and ends with credits
  (a scrolling list on black, a card on colour);
* burned-in yellow subtitles run over one shot;
* one scene is dark (the performer in low light, mirrored and reframed so it is no duplicate of
  the lit shot);
* an 8-frame insert (a flash of a photo) sits between two shots, so the cut after it must stay;
* and five encodings: ``sdr`` (1920x1080 H.264), ``anamorphic`` (a PAL DVD: 704x576 stored, sample
  aspect 16:11, shown 1024x576), ``hdr`` (10-bit PQ, BT.2020, tagged as HDR10 is),
  ``interlaced`` (PAL 576i, top field first, the two fields of a frame 1/50 s apart) and
  ``night`` (1280x720, every picture night-graded by :func:`~diffusion_bunny.demo.realclips.night_grade`:
  mean luma ~24, a third of the contrast, noise, a blue tint; cards and bars as they are).

:func:`build_release` writes the movie and a ``<movie>.truth.json`` beside it: every shot (first
frame, kind, the picture box in display pixels, subtitles, darkness, who is in it) and the
reference photos of the two people in it (``refs/<name>/``), so tests can judge what the exported
dataset holds: no bars, no text frame, subtitles cropped or dropped, the performer named in the
dark, faces not squashed.

    uv run python -m diffusion_bunny.demo.release --variant sdr --out data/release
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from diffusion_bunny.demo import overlays
from diffusion_bunny.demo.realclips import HAMILTON, TESTDATA, night_grade
from diffusion_bunny.media import hdr

KNN = TESTDATA / "face_recognition_examples" / "knn_examples"
LIN_REFERENCE = TESTDATA / "face_recognition_examples" / "lin-manuel-miranda.png"
#: Bump when the rendering changes (the cache name carries it).
VERSION = 1
FPS = 24
#: The picture's aspect inside the frame (scope).
PICTURE_ASPECT = 2.40


@dataclass(frozen=True)
class Variant:
    """How the film is stored: frame size as shown, stored size and sample aspect, encoding."""

    name: str
    display: tuple[int, int]
    stored: tuple[int, int]
    sar: Fraction = Fraction(1)
    hdr: str | None = None
    interlaced: bool = False
    night: bool = False  # the pictures night-graded (realclips.night_grade); cards and bars as they are

    @property
    def picture(self) -> tuple[int, int, int, int]:
        """The letterboxed picture in display pixels: (left, top, right, bottom)."""
        w, h = self.display
        ph = 2 * round(w / PICTURE_ASPECT / 2)
        top = (h - ph) // 2
        return 0, top, w, top + ph


VARIANTS = {
    "sdr": Variant("sdr", (1920, 1080), (1920, 1080)),
    "anamorphic": Variant("anamorphic", (1024, 576), (704, 576), Fraction(16, 11)),
    "hdr": Variant("hdr", (1280, 720), (1280, 720), hdr="pq"),
    "interlaced": Variant("interlaced", (1024, 576), (720, 576), Fraction(64, 45), interlaced=True),
    "night": Variant("night", (1280, 720), (1280, 720), night=True),
}


@dataclass(frozen=True)
class Segment:
    """One shot of the film."""

    kind: str  # title | credits | picture | insert
    frames: int
    source: tuple[int, int] | None = None  # Hamilton frames [start, end) for picture shots
    photo: str | None = None  # a knn photo for inserts
    text: tuple[str, ...] = ()
    background: tuple[int, int, int] = (0, 0, 0)  # RGB of a card
    subtitles: tuple[str, ...] = ()
    dark: float = 1.0  # gain on the picture (1: as shot)
    mirror: bool = False
    zoom: float = 1.0
    people: tuple[str, ...] = ()  # who a person would name in it
    scroll: bool = False


#: The film: 377 frames, 15.7 s at 24 fps.
TIMELINE: tuple[Segment, ...] = (
    Segment("title", 36, text=("A DIFFUSION BUNNY PICTURE",)),
    Segment("title", 36, text=("HAMILTON", "AT THE WHITE HOUSE"), background=(22, 66, 96)),
    Segment("picture", 20, source=(0, 20), people=("lin_manuel_miranda",)),
    Segment(
        "picture",
        60,
        source=(82, 142),
        subtitles=("I am not throwing away my shot!", "Hey yo, I'm just like my country"),
        people=("lin_manuel_miranda",),
    ),
    Segment("insert", 8, photo="test/obama1.jpg"),
    Segment("picture", 64, source=(211, 275), people=("obama",)),
    Segment(
        "picture", 69, source=(142, 211), dark=0.45, mirror=True, zoom=1.12, people=("lin_manuel_miranda",)
    ),
    Segment(
        "credits",
        48,
        text=("Directed by", "A. Smithee", "Music by", "L.-M. Miranda", "Edited by", "T. Schoonmaker"),
        scroll=True,
    ),
    Segment("credits", 36, text=("THE END",), background=(110, 24, 30)),
)


def _fit_width(img: np.ndarray, size: tuple[int, int], zoom: float = 1.0, mirror: bool = False) -> np.ndarray:
    """``img`` scaled to cover ``size`` (times ``zoom``) and centre-cropped to it."""
    w, h = size
    ih, iw = img.shape[:2]
    scale = max(w / iw, h / ih) * zoom
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    big = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    left, top = (nw - w) // 2, (nh - h) // 2
    out = big[top : top + h, left : left + w]
    return np.ascontiguousarray(out[:, ::-1] if mirror else out)


@dataclass
class Film:
    """The rendered pictures (display size, RGB) of one variant, shot by shot."""

    variant: Variant
    hamilton: np.ndarray  # [N, H, W, 3] RGB
    photos: dict[str, np.ndarray] = field(default_factory=dict)

    def picture_size(self) -> tuple[int, int]:
        left, top, right, bottom = self.variant.picture
        return right - left, bottom - top

    def photo(self, name: str) -> np.ndarray:
        if name not in self.photos:
            bgr = cv2.imread(str(KNN / name))
            if bgr is None:
                raise FileNotFoundError(f"{KNN / name} is absent (it lives in ../shared/testdata)")
            self.photos[name] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return self.photos[name]

    def picture(self, seg: Segment, j: int, t: float) -> np.ndarray:
        """Frame ``j`` of ``seg``'s picture (without bars), ``t`` the time within the film."""
        size = self.picture_size()
        if seg.kind in ("title", "credits"):
            if seg.scroll:
                return overlays.credits_roll(size, seg.text, j / max(1, seg.frames - 1), seg.background)
            return overlays.title_card(size, seg.text, seg.background)
        if seg.kind == "insert":
            assert seg.photo is not None
            img = _fit_width(self.photo(seg.photo), size, 1.0 + 0.01 * j)
            return (
                night_grade(img, np.random.default_rng([47, round(t * FPS)])) if self.variant.night else img
            )
        assert seg.source is not None
        start, end = seg.source
        src = self.hamilton[min(end - 1, start + j)]
        img = _fit_width(src, size, seg.zoom, seg.mirror)
        if seg.dark != 1.0:
            img = np.clip(img.astype(np.float32) * seg.dark, 0, 255).astype(np.uint8)
        if self.variant.night:
            # Graded before the subtitles are burned in, as a release does; the noise is the
            # frame's own (seeded by the film's frame index), so frame_at gives the same picture.
            img = night_grade(img, np.random.default_rng([47, round(t * FPS)]))
        if seg.subtitles:
            line = seg.subtitles[min(len(seg.subtitles) - 1, j * len(seg.subtitles) // seg.frames)]
            img = overlays.burn_subtitles(img, line)
        return img

    def frames(self) -> Iterator[tuple[int, Segment, np.ndarray]]:
        """(film frame index, segment, RGB frame as shown with its bars)."""
        n = 0
        for seg in TIMELINE:
            for j in range(seg.frames):
                yield n, seg, self._framed(seg, j, n)
                n += 1

    def frame_at(self, index: int) -> np.ndarray:
        """Frame ``index`` of the film as shown (RGB, with its bars): the truth a decoded frame
        is compared with."""
        start = 0
        for seg in TIMELINE:
            if index < start + seg.frames:
                return self._framed(seg, index - start, index)
            start += seg.frames
        raise IndexError(f"the film has {start} frames, not {index + 1}")

    def _framed(self, seg: Segment, j: int, n: int) -> np.ndarray:
        w, h = self.variant.display
        left, top, right, bottom = self.variant.picture
        frame = np.zeros((h, w, 3), np.uint8)
        frame[top:bottom, left:right] = self.picture(seg, j, n / FPS)
        return frame


def load_hamilton(path: Path = HAMILTON) -> np.ndarray:
    """The Hamilton clip's 275 frames (RGB)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is absent (it lives in ../shared/testdata)")
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _stored(rgb: np.ndarray, variant: Variant) -> np.ndarray:
    """A frame as shown, squeezed to the stored size (anamorphic: narrower pixels)."""
    if variant.stored == variant.display:
        return rgb
    return cv2.resize(rgb, variant.stored, interpolation=cv2.INTER_AREA)


def _hdr_frame(rgb: np.ndarray, variant: Variant) -> Any:
    """An SDR picture graded into PQ (SDR white at HDR reference white) as a 10-bit frame."""
    planes = hdr.rgb_to_ycbcr10(hdr.sdr_to_hdr_rgb(rgb, variant.hdr or "pq"))
    w, h = variant.stored
    frame = av.VideoFrame(w, h, "yuv420p10le")
    y, cb, cr = planes
    # 4:2:0: chroma averaged over 2x2 blocks.
    cb = (
        cv2.resize(cb.astype(np.float32), (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        .round()
        .astype(np.uint16)
    )
    cr = (
        cv2.resize(cr.astype(np.float32), (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        .round()
        .astype(np.uint16)
    )
    for plane, data in zip(frame.planes, (y, cb, cr), strict=True):
        view = np.frombuffer(plane, np.uint16).reshape(plane.height, plane.line_size // 2)
        view[:, : data.shape[1]] = data
    return frame


def _weave(first: np.ndarray, second: np.ndarray, variant: Variant) -> np.ndarray:
    """An interlaced frame: even lines (the top field, shown first) from one instant, odd lines
    from the next one, as a camera scanning fields one after the other records them."""
    out = _stored(first, variant).copy()
    out[1::2] = _stored(second, variant)[1::2]
    return out


def _pictures(film: Film) -> Iterator[np.ndarray]:
    """The frames to encode, as stored: squeezed to the stored size, and for 576i each woven
    from two consecutive instants (the bottom field from the next frame's picture)."""
    variant = film.variant
    previous: np.ndarray | None = None
    for _, _, rgb in film.frames():
        if not variant.interlaced:
            yield _stored(rgb, variant)
            continue
        if previous is not None:
            yield _weave(previous, rgb, variant)
        previous = rgb
    if previous is not None:
        yield _weave(previous, previous, variant)


def encode(film: Film, path: Path) -> None:
    """Encode the film with PyAV (libx264; 10-bit for HDR, interlaced coding for 576i)."""
    variant = film.variant
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height = variant.stored
        stream.pix_fmt = "yuv420p10le" if variant.hdr else "yuv420p"
        # ultrafast: the same picture at crf 18 in a bigger file, encoded in half the time (the
        # four variants are built for every test run: 41 s with veryfast, 31 s).
        options = {"crf": "18", "preset": "ultrafast"}
        if variant.interlaced:
            options["x264-params"] = "interlaced=1:tff=1"
        if variant.hdr:
            # HDR10's tags: BT.2020 primaries and matrix, PQ transfer (what players key on).
            cc = stream.codec_context
            cc.color_primaries, cc.color_trc, cc.colorspace, cc.color_range = 9, 16, 9, 1
        if variant.sar != 1:
            stream.codec_context.sample_aspect_ratio = variant.sar
        stream.options = options
        for picture in _pictures(film):
            if variant.hdr:
                vf = _hdr_frame(picture, variant)
            else:
                vf = av.VideoFrame.from_ndarray(picture, format="rgb24")
            out.mux(stream.encode(vf))
        out.mux(stream.encode(None))
    tmp.replace(path)


def truth(variant: Variant) -> dict[str, Any]:
    """What the film holds, shot by shot, by construction."""
    shots, start = [], 0
    for i, seg in enumerate(TIMELINE):
        shots.append(
            {
                "shot": i,
                "start_frame": start,
                "end_frame": start + seg.frames,
                "kind": seg.kind,
                "text": seg.kind in ("title", "credits"),
                # Text on black may go as too_dark before the text detector looks at it.
                "on_black": seg.kind in ("title", "credits") and seg.background == (0, 0, 0),
                "subtitles": bool(seg.subtitles),
                "dark": seg.dark < 1.0,
                "people": list(seg.people),
                "picture_box": list(variant.picture),
            }
        )
        start += seg.frames
    return {
        "version": VERSION,
        "variant": asdict(variant) | {"sar": str(variant.sar)},
        "fps": FPS,
        "frames": start,
        "cuts": [s["start_frame"] for s in shots[1:]],
        "shots": shots,
        "references": {"lin_manuel_miranda": "refs/lin_manuel_miranda", "obama": "refs/obama"},
    }


def write_references(out_dir: Path) -> Path:
    """Reference photos of the two people (one folder per name), copied from the testdata."""
    refs = out_dir / "refs"
    (refs / "lin_manuel_miranda").mkdir(parents=True, exist_ok=True)
    shutil.copy(LIN_REFERENCE, refs / "lin_manuel_miranda" / LIN_REFERENCE.name)
    (refs / "obama").mkdir(parents=True, exist_ok=True)
    for photo in sorted((KNN / "train" / "obama").iterdir()):
        shutil.copy(photo, refs / "obama" / photo.name)
    return refs


def build_release(out_dir: Path, variant: str = "sdr", hamilton: np.ndarray | None = None) -> Path:
    """The film of ``variant`` in ``out_dir`` (made once; reused while its version matches),
    with ``<movie>.truth.json`` and ``refs/`` beside it. Returns the movie's path."""
    spec = VARIANTS[variant]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"release_{variant}_v{VERSION}.{'mkv' if spec.hdr else 'mp4'}"
    truth_file = path.with_suffix(".truth.json")
    write_references(out_dir)
    if not path.is_file():
        film = Film(spec, load_hamilton() if hamilton is None else hamilton)
        encode(film, path)
    # The truth is cheap and written every time: a field added to it reaches a film made before.
    truth_file.write_text(json.dumps(truth(spec), indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), action="append")
    parser.add_argument("--out", type=Path, default=Path("data/release"))
    args = parser.parse_args(argv)
    for variant in args.variant or sorted(VARIANTS):
        print(build_release(args.out, variant))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
