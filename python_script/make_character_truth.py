"""Build the character truth set: short films made from other people's drawn and rendered
characters, every frame labelled from the composited alpha, plus the reference pictures a user
would give, split into sources to fit on and sources to report on.

    uv run python python_script/make_character_truth.py              # writes the whole folder
    uv run python python_script/make_character_truth.py --draw DIR   # contact sheets with the boxes
    uv run python python_script/make_character_truth.py --only supertux --draw DIR

Where it goes: ``test/stages/characters/data/character_truth/`` (``truth.json``, ``films/*.mp4``,
``refs/<source>/<character>/*``). docs/character-truth.md says what the set is and why.

Why build films instead of labelling a movie: every box then comes from the alpha mask of the
picture that was pasted, so no box is guessed, and the material (game sprites and portraits
under free licences) was made by nobody on the project. The only labels drawn by eye are the
head boxes: once per source picture for the key pose of each animation (``HEAD_KEYS``), carried
to the other frames of that animation by matching the head's pixels (:func:`track_head`), and
checked by eye on the ``--draw`` sheets.

The sources come from Debian packages and one PyPI wheel that are not project dependencies;
:func:`check_sources` prints what to install when one is missing:

    apt-get install supertux-data flare-game freedroidrpg-data wesnoth-1.16-data
    pip download --no-deps arcade==3.3.3 -d /tmp/arcade
    unzip -q /tmp/arcade/arcade-3.3.3-py3-none-any.whl -d /tmp/arcade/whl

Deterministic: every random choice comes from a generator seeded by the source's name, so a
rebuild writes the same labels (the films' bytes may differ with another libx264).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "test" / "stages" / "characters" / "data" / "character_truth"
W, H, FPS = 1280, 720, 24
CRF = 27
ARCADE_VERSION = "3.3.3"
ARCADE_DIR = (
    Path(os.environ.get("ARCADE_DIR", "/tmp/arcade/whl")) / "arcade" / "resources" / "assets" / "images"
)
SUPERTUX = Path("/usr/share/games/supertux2")
FLARE = Path("/usr/share/games/flare/mods/fantasycore")
FREEDROID = Path("/usr/share/freedroidrpg/data/graphics")
WESNOTH = Path("/usr/share/games/wesnoth/1.16/data/core/images")
#: Alpha above which a pixel counts as the character's (its soft edge and drop shadows do not).
ALPHA_ON = 128
#: A character whose visible pixels are fewer than this share of its own is left out of a frame.
MIN_VISIBLE = 0.2
MIN_SIDE = 16
#: A head box is given only while at least this share of the head's pixels is visible.
MIN_HEAD_VISIBLE = 0.5

INSTALL = {
    "kenney_toon": f"pip download --no-deps arcade=={ARCADE_VERSION} -d /tmp/arcade && "
    f"unzip -q /tmp/arcade/arcade-{ARCADE_VERSION}-py3-none-any.whl -d /tmp/arcade/whl",
    "kenney_critters": f"pip download --no-deps arcade=={ARCADE_VERSION} -d /tmp/arcade && "
    f"unzip -q /tmp/arcade/arcade-{ARCADE_VERSION}-py3-none-any.whl -d /tmp/arcade/whl",
    "wesnoth": "apt-get install wesnoth-1.16-data",
    "supertux": "apt-get install supertux-data",
    "flare": "apt-get install flare-game",
    "freedroid": "apt-get install freedroidrpg-data",
}


# ----------------------------------------------------------------------------------------------
# Source pictures


@dataclass
class Pose:
    """One source picture of a character: its pixels, the point that stays put between frames
    (the feet, for a walker), and its head box (``None`` until :func:`assign_heads`)."""

    pid: str
    rgba: np.ndarray
    anchor: tuple[float, float]
    group: str
    head: tuple[int, int, int, int] | None = None


@dataclass
class Character:
    """A character: its film animations (name -> poses, frames per second) and reference poses."""

    name: str
    kind: str
    anims: dict[str, tuple[list[Pose], float]]
    refs: list[tuple[str, Pose]]  # (form, pose)
    mode: str = "walk"  # walk | fly | portrait | crawl


@dataclass
class Source:
    """One source: where its pictures come from, its licence, its characters and backgrounds."""

    name: str
    kind: str
    split: str
    licence: str
    origin: str
    attribution: str
    characters: list[Character]
    backgrounds: list[np.ndarray]
    scale: tuple[float, float]  # range of the characters' scale in the film
    head_px: tuple[float, float]  # wanted head heights in the film (px)
    fit_body: bool = True


def rgba(path: Path) -> np.ndarray:
    """A picture as an RGBA uint8 array."""
    return np.asarray(Image.open(path).convert("RGBA")).copy()


def rgb(path: Path) -> np.ndarray:
    """A picture as an RGB uint8 array; a transparent sky (SuperTux's layers) shows pale blue."""
    im = Image.open(path).convert("RGBA")
    sky_ = Image.new("RGBA", im.size, (168, 208, 240, 255))
    sky_.alpha_composite(im)
    return np.asarray(sky_.convert("RGB")).copy()


def bottom_anchor(img: np.ndarray) -> tuple[float, float]:
    """Bottom centre of the picture: where equally sized animation frames stand."""
    return img.shape[1] / 2, float(img.shape[0])


def pose_file(path: Path, pid: str, group: str) -> Pose:
    """A pose from a picture file of its own."""
    img = rgba(path)
    return Pose(pid, img, bottom_anchor(img), group)


def drop_shadow(img: np.ndarray) -> np.ndarray:
    """Flare's renders carry their drop shadow (black at half alpha); the film draws none."""
    img = img.copy()
    shadow = (img[..., 3] <= 140) & (img[..., :3].max(axis=2) < 48)
    img[shadow, 3] = 0
    # What is left of the shadow is specks apart from the body: keep the large connected parts.
    n, labels, stats, _ = cv2.connectedComponentsWithStats((img[..., 3] > 0).astype(np.uint8), connectivity=8)
    if n > 2:
        largest = stats[1:, cv2.CC_STAT_AREA].max()
        small = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] < 0.05 * largest]
        img[np.isin(labels, small), 3] = 0
    return img


def flare_frames(name: str) -> tuple[np.ndarray, dict]:
    """A Flare enemy's atlas and its frames: (animation, frame, direction) -> (x, y, w, h, ox, oy)."""
    text = (FLARE / "animations" / "enemies" / f"{name}.txt").read_text()
    sheet = rgba(FLARE / re.search(r"image=(\S+)", text).group(1))
    frames, section = {}, None
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif line.startswith("frame="):
            i, d, x, y, w, h, ox, oy = map(int, line.split("=")[1].split(","))
            frames[(section, i, d)] = (x, y, w, h, ox, oy)
    return sheet, frames


def flare_pose(sheet: np.ndarray, frames: dict, anim: str, i: int, d: int) -> Pose:
    """One frame of a Flare animation, its shadow removed, anchored where Flare anchors it."""
    x, y, w, h, ox, oy = frames[(anim, i, d)]
    return Pose(f"{anim}_d{d}_{i}", drop_shadow(sheet[y : y + h, x : x + w]), (ox, oy), f"{anim}_d{d}")


def freedroid_atlas(name: str) -> dict[str, Pose]:
    """A FreedroidRPG character's frames by file name (``enemy_rot_00_walk-02``)."""
    folder = FREEDROID / "droids" / name
    out, sheet = {}, None
    for line in (folder / "atlas.txt").read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "*":
            sheet = rgba(folder / parts[1])
            continue
        x, y, w, h = map(int, parts[1:5])
        ox, oy = int(parts[6]), int(parts[7])
        key = parts[0].removesuffix(".png").removeprefix("enemy_")
        group = key.rsplit("-", 1)[0]
        out[key] = Pose(key, sheet[y : y + h, x : x + w].copy(), (-ox, -oy), group)
    return out


def sky(seed: int, top: tuple, bottom: tuple, hills: list[tuple], size=(1600, 900)) -> np.ndarray:
    """A plain painted backdrop (sky gradient, rolling hills, a few clouds) for the Kenney
    sources, whose package has no scenery of their style."""
    rng = np.random.default_rng(seed)
    w, h = size
    t = np.linspace(0, 1, h)[:, None, None]
    img = (np.array(top)[None, None] * (1 - t) + np.array(bottom)[None, None] * t) * np.ones((1, w, 1))
    x = np.arange(w)
    for _ in range(5):
        cx, cy, r = rng.uniform(0, w), rng.uniform(60, h * 0.35), rng.uniform(40, 90)
        for k in range(4):
            dx, dy = rng.uniform(-1.4, 1.4) * r, rng.uniform(-0.3, 0.3) * r
            yy, xx = np.ogrid[:h, :w]
            m = ((xx - cx - dx) ** 2 + ((yy - cy - dy) * 1.6) ** 2) < (r * (0.6 + 0.3 * k / 3)) ** 2
            img[m] = img[m] * 0.25 + np.array([250, 250, 252]) * 0.75
    for level, colour, amp in hills:
        phase = rng.uniform(0, 6.3, 3)
        line = h * level + amp * (
            np.sin(x / 210 + phase[0]) + 0.5 * np.sin(x / 97 + phase[1]) + 0.25 * np.sin(x / 41 + phase[2])
        )
        yy = np.arange(h)[:, None]
        img[yy >= line[None, :]] = colour
    return img.clip(0, 255).astype(np.uint8)


def load_kenney_toon() -> Source:
    """Kenney's toon characters (CC0): four people in one style, two of them women who differ
    mostly in hair and clothes."""
    folder = ARCADE_DIR / "animated_characters"
    names = {
        "female_adventurer": "femaleAdventurer",
        "female_person": "femalePerson",
        "male_adventurer": "maleAdventurer",
        "male_person": "malePerson",
    }
    chars = []
    for name, stem in names.items():

        def p(suffix: str, group: str, stem=stem, name=name) -> Pose:
            return pose_file(folder / name / f"{stem}_{suffix}.png", suffix, group)

        walk = [p(f"walk{i}", "walk") for i in range(8)]
        chars.append(
            Character(
                name,
                "drawn_person",
                {
                    "walk": (walk, 10.0),
                    "idle": ([p("idle", "idle")], 1.0),
                    "jump": ([p("jump", "jump")], 1.0),
                },
                [],
            )
        )
    fall = {c.name: pose_file(folder / c.name / f"{names[c.name]}_fall.png", "fall", "fall") for c in chars}
    refs = {
        "female_adventurer": ["sprite", "head_crop", "poster"],
        "female_person": ["head_crop"],
        "male_adventurer": ["poster", "sprite"],
        "male_person": ["sprite"],
    }
    for c in chars:
        c.refs = [(form, fall[c.name]) for form in refs[c.name]]
    backgrounds = [
        sky(1, (120, 180, 240), (200, 230, 250), [(0.62, (120, 190, 110), 30), (0.74, (90, 160, 80), 18)]),
        sky(2, (250, 190, 140), (250, 230, 200), [(0.58, (200, 150, 120), 40), (0.75, (150, 110, 90), 15)]),
        sky(3, (60, 80, 150), (150, 150, 200), [(0.65, (70, 90, 120), 35), (0.78, (40, 60, 80), 10)]),
    ]
    return Source(
        "kenney_toon",
        "drawn_person",
        "fit",
        "CC0-1.0",
        f"PyPI arcade {ARCADE_VERSION} wheel: arcade/resources/assets/images/animated_characters/",
        "Toon Characters by Kenney (www.kenney.nl), CC0, as shipped in the arcade wheel",
        chars,
        backgrounds,
        (0.9, 6.0),
        (40, 280),
    )


def load_kenney_critters() -> Source:
    """Kenney's platformer critters (CC0): a frog and a worm, drawn in one style."""
    folder = ARCADE_DIR / "enemies"

    def p(stem: str, group: str) -> Pose:
        return pose_file(folder / f"{stem}.png", stem, group)

    frog = Character("frog", "cartoon_animal", {"sit": ([p("frog", "sit")], 1.0)}, [], "crawl")
    frog.refs = [("sprite", p("frog_move", "ref")), ("poster", p("frog_move", "ref"))]
    worm = Character(
        "worm_green",
        "cartoon_animal",
        {"crawl": ([p("wormGreen", "crawl"), p("wormGreen_move", "crawl")], 4.0)},
        [],
    )
    worm.mode = "crawl"
    worm.refs = [("head_crop", p("wormGreen_dead", "ref"))]
    backgrounds = [
        sky(11, (140, 200, 250), (220, 240, 250), [(0.7, (110, 180, 90), 20)]),
        sky(12, (250, 220, 160), (250, 240, 220), [(0.66, (170, 140, 90), 30), (0.8, (130, 100, 70), 12)]),
        sky(13, (90, 140, 110), (170, 210, 170), [(0.6, (60, 110, 70), 40), (0.75, (40, 90, 50), 15)]),
    ]
    return Source(
        "kenney_critters",
        "cartoon_animal",
        "fit",
        "CC0-1.0",
        f"PyPI arcade {ARCADE_VERSION} wheel: arcade/resources/assets/images/enemies/",
        "Platformer Pack Redux enemies by Kenney (www.kenney.nl), CC0, as shipped in the arcade wheel",
        [frog, worm],
        backgrounds,
        (0.5, 3.2),
        (40, 260),
    )


def load_wesnoth() -> Source:
    """Battle for Wesnoth's painted portraits (GPL-2+): a human marshal and an orcish ruler, each
    painted twice; the film shows one painting, the references the other."""
    port = WESNOTH / "portraits"
    marshal = Character(
        "marshal",
        "drawn_person",
        {"portrait": ([pose_file(port / "humans" / "marshal.png", "marshal", "portrait")], 1.0)},
        [],
        "portrait",
    )
    m2 = pose_file(port / "humans" / "marshal-2.png", "marshal-2", "ref")
    marshal.refs = [("head_crop", m2), ("poster", m2)]
    ruler = Character(
        "orc_ruler",
        "drawn_person",
        {"portrait": ([pose_file(port / "orcs" / "ruler.png", "ruler", "portrait")], 1.0)},
        [],
        "portrait",
    )
    ruler.refs = [("sprite", pose_file(port / "orcs" / "ruler-2.png", "ruler-2", "ref"))]
    story = WESNOTH / "story"
    backgrounds = [
        rgb(story / f)
        for f in (
            "landscape-hills-01.jpg",
            "landscape-castle.jpg",
            "landscape-mountains-02.jpg",
            "swamp-01.jpg",
        )
    ]
    return Source(
        "wesnoth",
        "drawn_person",
        "held_out",
        "GPL-2.0-or-later",
        "Debian wesnoth-1.16-data 1:1.16.9-1: /usr/share/games/wesnoth/1.16/data/core/images/portraits/",
        "The Battle for Wesnoth portraits (marshal: humans/marshal*.png; orcish ruler: orcs/ruler*.png) "
        "and story landscapes, by the Wesnoth artists (data/core/images/portraits/ARTISTS)",
        [marshal, ruler],
        backgrounds,
        (0.35, 1.9),
        (40, 300),
    )


def load_supertux() -> Source:
    """SuperTux's creatures (GPL-3+): Tux, the owl, the yeti and the fat bat, one drawn style."""
    cr = SUPERTUX / "images" / "creatures"

    def p(path: str, group: str) -> Pose:
        return pose_file(cr / path, path.rsplit("/", 1)[-1].removesuffix(".png"), group)

    tux = Character(
        "tux",
        "cartoon_animal",
        {
            "walk": ([p(f"tux/big/walk-{i}.png", "walk") for i in range(8)], 12.0),
            "stand": ([p("tux/big/stand-0.png", "stand")], 1.0),
            "jump": ([p("tux/big/jump-0.png", "jump")], 1.0),
            "kick": ([p("tux/big/kick-0.png", "kick")], 1.0),
        },
        [("sprite", p("tux/big/skid-0.png", "ref")), ("poster", p("tux/big/buttjump-0.png", "ref"))],
    )
    owl = Character(
        "owl",
        "cartoon_animal",
        {"fly": ([p(f"owl/left-{i}.png", "fly") for i in range(5)], 10.0)},
        [("sprite", p("owl/left-6.png", "ref")), ("head_crop", p("owl/left-5.png", "ref"))],
        "fly",
    )
    yeti = Character(
        "yeti",
        "cartoon_animal",
        {
            "walk": ([p(f"yeti/y{i}.png", "walk") for i in range(1, 8)], 10.0),
            "stand": ([p("yeti/y.png", "stand")], 1.0),
        },
        [
            ("sprite", p("yeti/y-jump.png", "ref")),
            ("poster_webp", p("yeti/yeti_jump.png", "ref")),
            ("head_crop", p("yeti/y-jump2.png", "ref")),
        ],
    )
    bat = Character(
        "fatbat",
        "cartoon_animal",
        {"fly": ([p(f"fatbat/fly-{i}.png", "fly") for i in range(3)], 8.0)},
        [("sprite", p("fatbat/squished.png", "ref"))],
        "fly",
    )
    bg = SUPERTUX / "images" / "background"
    backgrounds = [
        rgb(bg / f)
        for f in (
            "snowmountains/snowmountains.png",
            "antarctic/arctis2.png",
            "forest/nighthills.png",
            "antarctic/misty_snowhills_small.png",
            "ghostforest/ghostforest_grave.png",
        )
    ]
    return Source(
        "supertux",
        "cartoon_animal",
        "held_out",
        "GPL-3.0-or-later",
        "Debian supertux-data 0.6.3-2: /usr/share/games/supertux2/images/creatures/ and images/background/",
        "SuperTux creature sprites and backgrounds by the SuperTux Devel Team",
        [tux, owl, yeti, bat],
        backgrounds,
        (1.3, 6.0),
        (40, 240),
    )


#: Flare: which animation and direction each wyvern shows in the film, and its references.
FLARE_FILM = {
    "wyvern_green": ("wyvern", [("stance", 6), ("run", 3)], [("sprite", "swing", 3, 6)]),
    "wyvern_fire": (
        "wyvern_fire",
        [("stance", 5), ("run", 1)],
        [("sprite", "cast", 4, 6), ("head_crop", "hit", 1, 7)],
    ),
    "wyvern_water": ("wyvern_water", [("stance", 7), ("run", 3)], [("poster", "swing", 4, 5)]),
}


def load_flare() -> Source:
    """Flare's rendered wyverns (CC-BY-SA 3.0+): one 3D model in three colourings."""
    chars = []
    for name, (stem, film, refs) in FLARE_FILM.items():
        sheet, frames = flare_frames(stem)
        anims = {
            f"{a}_d{d}": (
                [flare_pose(sheet, frames, a, i, d) for i in range(8)],
                10.0 if a == "stance" else 14.0,
            )
            for a, d in film
        }
        ref_poses = [(form, flare_pose(sheet, frames, a, i, d)) for form, a, i, d in refs]
        for _, pose in ref_poses:
            pose.group = "ref"
        chars.append(Character(name, "creature_3d", anims, ref_poses, "fly"))
    bg = FLARE / "images" / "menus" / "backgrounds"
    backgrounds = [rgb(bg / f) for f in ("badlands.png", "fire_temple.png", "ice_palace.png")]
    return Source(
        "flare",
        "creature_3d",
        "fit",
        "CC-BY-SA-3.0",
        "Debian flare-game 1.14-1: /usr/share/games/flare/mods/fantasycore/images/enemies/wyvern*.png "
        "(frames from animations/enemies/*.txt) and images/menus/backgrounds/",
        "Flare (Free Libre Action Roleplaying Engine) game art by Clint Bellanger and the Flare contributors",
        chars,
        backgrounds,
        (2.6, 6.5),
        (30, 90),
    )


#: FreedroidRPG: the rotations and animations each guard shows in the film.
FREEDROID_FILM = {
    "blue_guard": [("stand", 0), ("walk", 2), ("stand", 7), ("walk", 6)],
    "red_guard": [("stand", 1), ("walk", 6), ("stand", 0), ("walk", 2)],
}


def load_freedroid() -> Source:
    """FreedroidRPG's rendered guards (GPL-2+): one 3D model in blue and in red."""
    chars = []
    for name, film in FREEDROID_FILM.items():
        atlas = freedroid_atlas(name)
        anims = {
            f"{a}_r{r}": (
                [atlas[f"rot_{r:02d}_{a}-{i:02d}"] for i in range(5)],
                6.0 if a == "stand" else 10.0,
            )
            for a, r in film
        }
        portrait = pose_file(FREEDROID / "droids" / name / "portrait.png", "portrait", "ref")
        attack = atlas["rot_00_attack-02"]
        attack.group = "ref"
        refs = (
            [("sprite", portrait), ("head_crop", attack), ("poster", attack)]
            if name == "blue_guard"
            else [("poster", portrait)]
        )
        chars.append(Character(name, "creature_3d", anims, refs))
    bg = FREEDROID / "backgrounds"
    # The title picture's right half holds a character (Tux) and the credits picture robots:
    # only scenery without anyone in it is used.
    console = rgb(bg / "console_bg1.jpg")
    backgrounds = [console, rgb(bg / "title_wide.jpg")[:, :880].copy(), console[:, ::-1].copy()]
    return Source(
        "freedroid",
        "creature_3d",
        "held_out",
        "GPL-2.0-or-later",
        "Debian freedroidrpg-data 1.0-1: /usr/share/freedroidrpg/data/graphics/droids/{blue,red}_guard/ "
        "and graphics/backgrounds/",
        "FreedroidRPG character renders and backgrounds by the FreedroidRPG team",
        chars,
        backgrounds,
        (2.0, 5.5),
        (40, 120),
    )


LOADERS = {
    "kenney_toon": load_kenney_toon,
    "kenney_critters": load_kenney_critters,
    "wesnoth": load_wesnoth,
    "supertux": load_supertux,
    "flare": load_flare,
    "freedroid": load_freedroid,
}
REQUIRED = {
    "kenney_toon": ARCADE_DIR / "animated_characters",
    "kenney_critters": ARCADE_DIR / "enemies",
    "wesnoth": WESNOTH / "portraits",
    "supertux": SUPERTUX / "images" / "creatures",
    "flare": FLARE / "images" / "enemies",
    "freedroid": FREEDROID / "droids",
}


def check_sources(names: list[str]) -> None:
    """Stop with the install commands when a source's files are missing."""
    missing = [n for n in names if not REQUIRED[n].is_dir()]
    if missing:
        lines = sorted({INSTALL[n] for n in missing})
        sys.exit("missing sources " + ", ".join(missing) + "; install them with:\n  " + "\n  ".join(lines))


# ----------------------------------------------------------------------------------------------
# Head boxes: drawn by eye on the key pose of each animation (source pixels, left, top, right,
# bottom), carried to the animation's other frames by matching the head's pixels.

HEAD_KEYS: dict[str, dict[str, tuple[int, int, int, int]]] = {
    "kenney_toon/female_adventurer": {
        "walk0": (22, 37, 72, 83),
        "idle": (22, 37, 72, 84),
        "jump": (22, 35, 70, 80),
        "fall": (22, 36, 72, 81),
    },
    "kenney_toon/female_person": {
        "walk0": (22, 37, 72, 81),
        "idle": (22, 38, 72, 82),
        "jump": (20, 34, 70, 78),
        "fall": (22, 36, 72, 80),
    },
    "kenney_toon/male_adventurer": {
        "walk0": (22, 24, 76, 83),
        "idle": (22, 22, 75, 84),
        "jump": (22, 22, 73, 80),
        "fall": (22, 22, 74, 81),
    },
    "kenney_toon/male_person": {
        "walk0": (22, 37, 72, 83),
        "idle": (22, 37, 72, 84),
        "jump": (22, 34, 70, 80),
        "fall": (22, 36, 72, 81),
    },
    "kenney_critters/frog": {"frog": (30, 58, 88, 98), "frog_move": (10, 32, 70, 88)},
    "kenney_critters/worm_green": {"wormGreen": (5, 94, 40, 125), "wormGreen_dead": (5, 96, 40, 124)},
    "wesnoth/marshal": {"marshal": (145, 42, 250, 150), "marshal-2": (148, 35, 265, 150)},
    "wesnoth/orc_ruler": {"ruler": (145, 130, 235, 228), "ruler-2": (128, 78, 238, 178)},
    "supertux/tux": {
        "walk-0": (12, 12, 52, 42),
        "stand-0": (14, 12, 55, 42),
        "jump-0": (12, 11, 52, 42),
        "kick-0": (12, 12, 52, 42),
        "skid-0": (14, 14, 52, 47),
        "buttjump-0": (20, 8, 58, 42),
    },
    "supertux/owl": {"left-0": (8, 1, 53, 40), "left-5": (14, 1, 52, 40), "left-6": (12, 1, 50, 40)},
    "supertux/yeti": {
        "y1": (30, 5, 80, 62),
        "y": (18, 8, 68, 62),
        "y-jump": (18, 5, 70, 62),
        "yeti_jump": (35, 12, 98, 78),
        "y-jump2": (15, 8, 70, 68),
    },
    "supertux/fatbat": {"fly-0": (14, 0, 50, 42), "squished": (5, 2, 46, 37)},
    "flare/wyvern_green": {
        "stance_d6_0": (30, 0, 37, 8),
        "run_d3_0": (48, 1, 57, 9),
        "swing_d6_3": (44, 0, 51, 8),
    },
    "flare/wyvern_fire": {
        "stance_d5_0": (38, 0, 50, 10),
        "run_d1_0": (17, 2, 28, 11),
        "cast_d6_4": (39, 12, 47, 22),
        "hit_d7_1": (55, 4, 62, 14),
    },
    "flare/wyvern_water": {
        "stance_d7_0": (10, 0, 20, 9),
        "run_d3_0": (50, 1, 58, 9),
        "swing_d5_4": (45, 2, 56, 13),
    },
    "freedroid/blue_guard": {
        "rot_00_stand-00": (4, 0, 36, 26),
        "rot_02_walk-00": (10, 0, 38, 26),
        "rot_07_stand-00": (10, 0, 40, 27),
        "rot_06_walk-00": (8, 0, 38, 26),
        "rot_00_attack-02": (12, 0, 42, 26),
    },
    "freedroid/red_guard": {
        "rot_01_stand-00": (8, 0, 36, 27),
        "rot_06_walk-00": (8, 0, 38, 26),
        "rot_00_stand-00": (4, 0, 36, 26),
        "rot_02_walk-00": (10, 0, 38, 26),
    },
}


def _premultiplied(img: np.ndarray) -> np.ndarray:
    a = img[..., 3:4].astype(np.float32) / 255
    return np.concatenate([img[..., :3].astype(np.float32) * a, img[..., 3:4].astype(np.float32)], axis=2)


def track_head(key: Pose, other: Pose) -> tuple[int, int, int, int]:
    """``other``'s head box: the key's box moved to where the key's head pixels match best
    (animation frames of one pose move the head, they do not redraw it). The search is around
    the place the anchors say, within a third of the head's size."""
    lft, t, r, b = key.head
    patch = _premultiplied(key.rgba[t:b, lft:r])
    dx0 = round(other.anchor[0] - key.anchor[0])
    dy0 = round(other.anchor[1] - key.anchor[1])
    pad = max(4, (b - t) // 3, (r - lft) // 3)
    img = _premultiplied(other.rgba)
    hh, ww = img.shape[:2]
    big = np.zeros((hh + 2 * (b - t + pad), ww + 2 * (r - lft + pad), 4), np.float32)
    oy, ox = b - t + pad, r - lft + pad
    big[oy : oy + hh, ox : ox + ww] = img
    x0, y0 = lft + dx0 - pad + ox, t + dy0 - pad + oy
    window = big[max(0, y0) : y0 + (b - t) + 2 * pad, max(0, x0) : x0 + (r - lft) + 2 * pad]
    scores = cv2.matchTemplate(window, patch, cv2.TM_SQDIFF)
    _, _, (mx, my), _ = cv2.minMaxLoc(scores)
    nl = max(0, x0) + mx - ox
    nt = max(0, y0) + my - oy
    return (int(nl), int(nt), int(nl + r - lft), int(nt + b - t))


def assign_heads(source: Source) -> None:
    """Every pose's head box: its own key where one was drawn, else tracked from the first pose
    of its animation that has a key (every animation's first frame has one)."""
    for char in source.characters:
        keys = HEAD_KEYS.get(f"{source.name}/{char.name}", {})
        poses = [p for ps, _ in char.anims.values() for p in ps] + [p for _, p in char.refs]
        for pose in poses:
            if pose.pid in keys:
                pose.head = keys[pose.pid]
        for poses_, _ in char.anims.values():
            key = next((p for p in poses_ if p.pid in keys), None)
            if key is None:
                raise SystemExit(f"{source.name}/{char.name}: no head key for {[p.pid for p in poses_]}")
            for pose in poses_:
                if pose.head is None:
                    pose.head = track_head(key, pose)
        for form, pose in char.refs:
            if form == "head_crop" and pose.head is None:
                raise SystemExit(f"{source.name}/{char.name}: reference {pose.pid} needs a head key")


# ----------------------------------------------------------------------------------------------
# The film: shots planned from a seeded generator, frames composited, labels from the alpha.


@dataclass
class Actor:
    """A character in a shot: animation, mirror, scale over the shot and anchor path (film px)."""

    char: Character
    anim: str
    mirror: bool
    scale: tuple[float, float]
    path: tuple[tuple[float, float], tuple[float, float]]
    bob: float = 0.0
    phase: float = 0.0


@dataclass
class Shot:
    """A shot: its length in frames, background and camera move, and the actors in drawing order."""

    n: int
    background: int
    camera: tuple[tuple[float, float, float], tuple[float, float, float]]  # (cx, cy, zoom) start, end
    actors: list[Actor] = field(default_factory=list)


def head_height(char: Character, anim: str) -> float:
    """The key pose's head height (source px): what the planner sizes a character by."""
    pose = char.anims[anim][0][0]
    return pose.head[3] - pose.head[1]


def plan_film(source: Source, rng: np.random.Generator) -> list[Shot]:
    """12-14 shots of 1.5-4 s: two without anyone, about a third with two or three characters,
    heads from small to close-up, some mirrored or cut by the frame's edge."""
    n_shots = int(rng.integers(12, 15))
    counts = [0, 0] + [2, 2, 2, 3] + [1] * (n_shots - 6)
    counts = [min(c, len(source.characters)) for c in counts]
    rng.shuffle(counts)
    shots = []
    for count in counts:
        n = round(rng.uniform(1.5, 4.0) * FPS)
        bg = int(rng.integers(len(source.backgrounds)))
        z0 = rng.uniform(1.0, 1.35)
        z1 = z0 * rng.choice([1.0, rng.uniform(1.1, 1.3), rng.uniform(0.78, 0.92)])
        cam = (
            (rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.6), z0),
            (rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.6), z1),
        )
        shot = Shot(n, bg, cam)
        chars = list(rng.choice(len(source.characters), size=count, replace=False)) if count else []
        slots = np.linspace(0, 1, count + 2)[1:-1] if count else []
        for slot, ci in zip(slots, chars, strict=True):
            shot.actors.append(plan_actor(source, source.characters[ci], slot, count, n, rng))
        shot.actors.sort(key=lambda a: a.scale[0] * head_height(a.char, a.anim))
        shots.append(shot)
    return shots


def plan_actor(
    source: Source, char: Character, slot: float, count: int, n: int, rng: np.random.Generator
) -> Actor:
    """One character's part in a shot: its size from a head height drawn log-uniformly within the
    source's range (smaller when it shares the shot), its path by how it moves."""
    anim = str(rng.choice(list(char.anims)))
    lo, hi = source.head_px
    if count > 1:
        hi = min(hi, lo + (hi - lo) * 0.45)
    hh = head_height(char, anim)
    s = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) / hh
    s = float(np.clip(s, *source.scale))
    grow = rng.choice([1.0, 1.0, rng.uniform(1.1, 1.35)])
    pose = char.anims[anim][0][0]
    body_h = pose.rgba.shape[0] * s
    mirror = bool(rng.integers(2))
    x = W * (slot + rng.uniform(-0.08, 0.08))
    if rng.random() < 0.2 and count <= 2:  # cut by the frame's side
        x = rng.choice([rng.uniform(-0.05, 0.08), rng.uniform(0.92, 1.05)]) * W
    if char.mode == "portrait":
        y = H + rng.uniform(0.0, 0.25) * body_h
        start = (x + rng.choice([-1, 1]) * rng.uniform(0, 0.25) * W, y)
        end = (x, y)
        return Actor(
            char, anim, mirror, (s, s * grow), (start, end), bob=rng.uniform(0, 6), phase=rng.uniform(0, 6)
        )
    if char.mode == "fly":
        y = rng.uniform(0.35, 0.75) * H + body_h / 2
        dx = rng.uniform(0.1, 0.35) * W * (-1 if mirror else 1) * rng.choice([0.3, 1.0])
        return Actor(
            char,
            anim,
            mirror,
            (s, s * grow),
            ((x - dx / 2, y), (x + dx / 2, y - rng.uniform(-0.1, 0.1) * H)),
            bob=rng.uniform(4, 18),
            phase=rng.uniform(0, 6),
        )
    # walkers and crawlers stand on a ground line; big ones are cut by the bottom edge
    ground = rng.uniform(0.78, 0.95) * H
    if body_h > 0.8 * H:
        ground = H + (body_h - 0.8 * H) * rng.uniform(0.3, 1.0)
    moving = anim in ("walk", "crawl") or anim.startswith(("walk", "run"))
    facing = 1 if not mirror else -1
    if moving:
        dist = rng.uniform(0.15, 0.5) * W * facing * min(1.0, s / 3)
        if source.name == "supertux":
            dist *= -1  # SuperTux's sprites face right; mirror means left
        start, end = (x - dist / 2, ground), (x + dist / 2, ground)
    else:
        start = end = (x, ground)
    return Actor(char, anim, mirror, (s, s * grow), (start, end), bob=0.0 if moving else rng.uniform(0, 4))


def camera_view(bg: np.ndarray, cam: tuple[float, float, float]) -> np.ndarray:
    """The background as the camera sees it: a 16:9 window of the picture around (cx, cy) in
    picture fractions, ``zoom`` times smaller than the largest such window, resized to the film."""
    cx, cy, zoom = cam
    h, w = bg.shape[:2]
    vw = min(w, h * W / H) / zoom
    vh = vw * H / W
    x0 = float(np.clip(cx * w - vw / 2, 0, w - vw))
    y0 = float(np.clip(cy * h - vh / 2, 0, h - vh))
    m = np.array([[W / vw, 0, -x0 * W / vw], [0, H / vh, -y0 * H / vh]], np.float32)
    return cv2.warpAffine(bg, m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def place(pose: Pose, scale: float, mirror: bool, anchor: tuple[float, float]):
    """The pose scaled (and mirrored) with its anchor at ``anchor``: (premultiplied RGBA float
    image, top-left x, top-left y, affine map from source px to film px as (sx, ox, sy, oy))."""
    h, w = pose.rgba.shape[:2]
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    pm = _premultiplied(pose.rgba)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    img = cv2.resize(pm, (nw, nh), interpolation=interp)
    ax = pose.anchor[0] * nw / w
    if mirror:
        img = img[:, ::-1]
        ax = nw - ax
    x0 = round(anchor[0] - ax)
    y0 = round(anchor[1] - pose.anchor[1] * nh / h)
    sx = nw / w
    return img, x0, y0, (sx, x0, nh / h, y0, nw, mirror)


def map_box(box, tf) -> tuple[float, float, float, float]:
    """A source-pixel box in film pixels under :func:`place`'s transform."""
    sx, x0, sy, y0, nw, mirror = tf
    left, t, r, b = box
    if mirror:
        left, r = (nw / sx - r), (nw / sx - left)
    return (x0 + left * sx, y0 + t * sy, x0 + r * sx, y0 + b * sy)


def render_frame(source: Source, shot: Shot, k: int) -> tuple[np.ndarray, list[dict]]:
    """Frame ``k`` of a shot and the labels of the characters seen in it."""
    u = k / max(1, shot.n - 1)
    cam = tuple(a + (b - a) * u for a, b in zip(*shot.camera, strict=True))
    frame = camera_view(source.backgrounds[shot.background], cam).astype(np.float32)
    placed = []
    for actor in shot.actors:
        poses, fps = actor.char.anims[actor.anim]
        pose = poses[int(k * fps / FPS) % len(poses)]
        s = actor.scale[0] + (actor.scale[1] - actor.scale[0]) * u
        (xa, ya), (xb, yb) = actor.path
        ease = u
        if actor.char.mode == "portrait":
            ease = 1 - (1 - min(1.0, u * 2.5)) ** 2  # slides in, then holds
        x = xa + (xb - xa) * ease
        y = ya + (yb - ya) * ease + actor.bob * math.sin(2 * math.pi * k / FPS * 0.8 + actor.phase)
        img, x0, y0, tf = place(pose, s, actor.mirror, (x, y))
        placed.append((actor, pose, img, x0, y0, tf))
    masks = []
    for actor, pose, img, x0, y0, tf in placed:
        h, w = img.shape[:2]
        fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(W, x0 + w), min(H, y0 + h)
        full = img[..., 3] > ALPHA_ON
        vis = np.zeros((H, W), bool)
        if fx1 > fx0 and fy1 > fy0:
            sub = img[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
            a = sub[..., 3:4] / 255
            frame[fy0:fy1, fx0:fx1] = sub[..., :3] + frame[fy0:fy1, fx0:fx1] * (1 - a)
            vis[fy0:fy1, fx0:fx1] = full[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
        for m in masks:  # earlier characters lose what this one covers
            m["vis"] &= ~vis
        masks.append({"actor": actor, "pose": pose, "full": full, "x0": x0, "y0": y0, "tf": tf, "vis": vis})
    labels = []
    for m in masks:
        full_n = int(m["full"].sum())
        vis = m["vis"]
        vis_n = int(vis.sum())
        if full_n == 0 or vis_n < MIN_VISIBLE * full_n:
            continue
        ys, xs = np.nonzero(vis)
        body = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        if body[2] - body[0] < MIN_SIDE or body[3] - body[1] < MIN_SIDE:
            continue
        head = None
        if m["pose"].head is not None:
            hl, ht, hr, hb = map_box(m["pose"].head, m["tf"])
            li, ti, ri, bi = (math.floor(hl), math.floor(ht), math.ceil(hr), math.ceil(hb))
            hf = m["full"][
                max(0, ti - m["y0"]) : max(0, bi - m["y0"]), max(0, li - m["x0"]) : max(0, ri - m["x0"])
            ]
            hv = vis[max(0, ti) : max(0, bi), max(0, li) : max(0, ri)]
            if hf.sum() > 0 and hv.sum() >= MIN_HEAD_VISIBLE * hf.sum():
                head = [max(0, li), max(0, ti), min(W, ri), min(H, bi)]
        labels.append({"character": m["actor"].char.name, "body": body, "head": head})
    return np.clip(frame, 0, 255).astype(np.uint8), labels


def make_film(source: Source, path: Path) -> tuple[list[dict], list[dict], int]:
    """Render and encode the source's film; its shots and per-frame appearances."""
    rng = np.random.default_rng(zlib.crc32(source.name.encode()))
    shots = plan_film(source, rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    stream.options = {"crf": str(CRF), "preset": "medium", "threads": "2"}
    appearances, shot_rows, f = [], [], 0
    for i, shot in enumerate(shots):
        present: list[str] = []
        for k in range(shot.n):
            frame, labels = render_frame(source, shot, k)
            for lab in labels:
                appearances.append({"frame": f, **lab})
                if lab["character"] not in present:
                    present.append(lab["character"])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
            f += 1
        order = [c.name for c in source.characters]
        shot_rows.append(
            {
                "shot_id": i,
                "start_frame": f - shot.n,
                "end_frame": f,
                "characters": sorted(present, key=order.index),
            }
        )
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return shot_rows, appearances, f


# ----------------------------------------------------------------------------------------------
# References: the pictures a user has at hand, made from poses the film never shows.


def composite(
    bg: np.ndarray, pose: Pose, scale: float, x: float, y: float, mirror: bool = False
) -> np.ndarray:
    """``pose`` pasted on a copy of ``bg`` with its anchor at (x, y)."""
    out = bg.astype(np.float32).copy()
    img, x0, y0, _ = place(pose, scale, mirror, (x, y))
    h, w = img.shape[:2]
    H_, W_ = out.shape[:2]
    fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(W_, x0 + w), min(H_, y0 + h)
    if fx1 > fx0 and fy1 > fy0:
        sub = img[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
        out[fy0:fy1, fx0:fx1] = sub[..., :3] + out[fy0:fy1, fx0:fx1] * (1 - sub[..., 3:4] / 255)
    return np.clip(out, 0, 255).astype(np.uint8)


def make_ref(
    source: Source, char: Character, form: str, pose: Pose, rng: np.random.Generator
) -> tuple[str, bytes]:
    """One reference file: (file name, bytes)."""
    if form == "sprite":
        buf = io.BytesIO()
        Image.fromarray(pose.rgba).save(buf, "PNG", optimize=True)
        return f"sprite_{pose.pid}.png", buf.getvalue()
    bg = source.backgrounds[int(rng.integers(len(source.backgrounds)))]
    h, w = pose.rgba.shape[:2]
    if form == "head_crop":
        scale = max(1.0, 170 / (pose.head[3] - pose.head[1]))
        canvas = cv2.resize(bg, (int(w * scale * 2.5), int(h * scale * 1.6)), interpolation=cv2.INTER_AREA)
        cx, cy = canvas.shape[1] / 2, canvas.shape[0] * 0.8
        img = composite(canvas, pose, scale, cx, cy)
        _, _, tf = place(pose, scale, False, (cx, cy))[1:]
        hl, t, r, b = map_box(pose.head, tf)
        mx, my = (r - hl) * rng.uniform(0.2, 0.4), (b - t) * rng.uniform(0.2, 0.4)
        box = [
            int(max(0, hl - mx)),
            int(max(0, t - my)),
            int(min(img.shape[1], r + mx)),
            int(min(img.shape[0], b + my)),
        ]
        crop = img[box[1] : box[3], box[0] : box[2]]
        buf = io.BytesIO()
        Image.fromarray(crop).save(buf, "JPEG", quality=88)
        return f"head_crop_{pose.pid}.jpg", buf.getvalue()
    # poster: the character large on a scene, a bit of another character and a title, loosely cropped
    pw, ph = 900, 600
    canvas = camera_view(bg, (rng.uniform(0.3, 0.7), 0.5, 1.2))
    canvas = cv2.resize(canvas, (pw, ph), interpolation=cv2.INTER_AREA)
    scale = min(ph * 0.75 / h, pw * 0.5 / w)
    others = [c for c in source.characters if c is not char]
    if others:
        other = others[int(rng.integers(len(others)))]
        op = next(iter(other.anims.values()))[0][0]
        osc = scale * op.rgba.shape[0] / h * rng.uniform(0.8, 1.0) * h / op.rgba.shape[0]
        canvas = composite(canvas, op, osc, pw * 0.97, ph * 0.95, mirror=True)
    canvas = composite(canvas, pose, scale, pw * 0.42, ph * 0.92, mirror=bool(rng.integers(2)))
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    try:
        font = ImageFont.truetype("DejaVuSans-Bold.ttf", 44)
    except OSError:
        font = ImageFont.load_default()
    draw.text(
        (30, 24),
        char.name.replace("_", " ").upper(),
        fill=(255, 250, 220),
        font=font,
        stroke_width=3,
        stroke_fill=(40, 30, 20),
    )
    x0, y0 = int(rng.uniform(0, 0.12) * pw), int(rng.uniform(0, 0.1) * ph)
    im = im.crop((x0, y0, pw - int(rng.uniform(0.02, 0.08) * pw), ph))
    buf = io.BytesIO()
    if form == "poster_webp":
        im.save(buf, "WEBP", quality=82)
        return f"poster_{pose.pid}.webp", buf.getvalue()
    im.save(buf, "JPEG", quality=85)
    return f"poster_{pose.pid}.jpg", buf.getvalue()


# ----------------------------------------------------------------------------------------------
# The truth file and the contact sheets

ABOUT = (
    "Character truth set: one short film per source, made by compositing drawn or rendered characters "
    "from free game art onto backgrounds; every frame's characters labelled from the composited alpha "
    "(body) and a head box drawn by eye once per source picture (carried to animation frames by "
    "matching the head's pixels). Boxes are [left, top, right, bottom) in film pixels. Shots: "
    "start_frame inclusive, end_frame exclusive. Sources marked held_out are for reporting only: "
    "never fit or tune on them. Built by python_script/make_character_truth.py; see docs/character-truth.md."
)


def build_source(source: Source, out: Path) -> dict:
    """Film, references and the truth entry of one source."""
    assign_heads(source)
    film = f"films/{source.name}.mp4"
    shots, appearances, n_frames = make_film(source, out / film)
    rng = np.random.default_rng(zlib.crc32(source.name.encode()) + 1)
    chars = []
    for char in source.characters:
        folder = out / "refs" / source.name / char.name
        folder.mkdir(parents=True, exist_ok=True)
        paths, forms = [], []
        for form, pose in char.refs:
            name, data = make_ref(source, char, form, pose, rng)
            (folder / name).write_bytes(data)
            paths.append(f"refs/{source.name}/{char.name}/{name}")
            forms.append("poster" if form == "poster_webp" else form)
        chars.append({"name": char.name, "kind": char.kind, "refs": paths, "ref_forms": forms})
    return {
        "name": source.name,
        "split": source.split,
        "kind": source.kind,
        "licence": source.licence,
        "origin": source.origin,
        "attribution": source.attribution,
        "film": film,
        "width": W,
        "height": H,
        "fps": FPS,
        "n_frames": n_frames,
        "characters": chars,
        "shots": shots,
        "appearances": appearances,
    }


COLOURS = [(255, 60, 60), (60, 200, 255), (255, 220, 0), (120, 255, 120), (255, 120, 255), (255, 160, 40)]


def draw_sheets(truth: dict, out: Path, draw_dir: Path, only: list[str]) -> None:
    """Per source, one sheet of two frames per shot (a quarter and three quarters in) as decoded
    from the film, with each appearance's body box, head box and name: for checking by eye."""
    draw_dir.mkdir(parents=True, exist_ok=True)
    for src in truth["sources"]:
        if src["name"] not in only:
            continue
        wanted = {}
        for shot in src["shots"]:
            n = shot["end_frame"] - shot["start_frame"]
            for q in (0.25, 0.75):
                wanted[shot["start_frame"] + int(n * q)] = shot["shot_id"]
        by_frame: dict[int, list] = {}
        for a in src["appearances"]:
            by_frame.setdefault(a["frame"], []).append(a)
        names = [c["name"] for c in src["characters"]]
        tiles = []
        with av.open(str(out / src["film"])) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i not in wanted:
                    continue
                im = frame.to_image()
                d = ImageDraw.Draw(im)
                for a in by_frame.get(i, []):
                    c = COLOURS[names.index(a["character"]) % len(COLOURS)]
                    d.rectangle(a["body"], outline=c, width=4)
                    if a["head"]:
                        d.rectangle(a["head"], outline=(255, 255, 255), width=3)
                        d.rectangle(
                            [v + 3 if j < 2 else v - 3 for j, v in enumerate(a["head"])], outline=c, width=2
                        )
                    d.text(
                        (a["body"][0] + 6, a["body"][1] + 4),
                        a["character"],
                        fill=c,
                        stroke_width=2,
                        stroke_fill=(0, 0, 0),
                    )
                d.text(
                    (8, 8),
                    f"shot {wanted[i]} frame {i}",
                    fill=(255, 255, 255),
                    stroke_width=2,
                    stroke_fill=(0, 0, 0),
                )
                tiles.append(im.resize((480, 270)))
        cols = 4
        sheet = Image.new("RGB", (cols * 480, ((len(tiles) + cols - 1) // cols) * 270))
        for j, t in enumerate(tiles):
            sheet.paste(t, ((j % cols) * 480, (j // cols) * 270))
        sheet.save(draw_dir / f"{src['name']}.png")
        print(f"wrote {draw_dir / (src['name'] + '.png')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--only", nargs="*", choices=list(LOADERS), help="rebuild only these sources")
    parser.add_argument("--draw", type=Path, help="write contact sheets with the boxes to this folder")
    parser.add_argument(
        "--draw-only", action="store_true", help="draw from the existing folder, build nothing"
    )
    args = parser.parse_args(argv)
    only = args.only or list(LOADERS)
    truth_path = args.out / "truth.json"
    if not args.draw_only:
        check_sources(only)
        old = json.loads(truth_path.read_text()) if truth_path.exists() and args.only else {"sources": []}
        kept = {s["name"]: s for s in old["sources"] if s["name"] not in only}
        if not args.only and args.out.exists():
            for sub in ("films", "refs"):
                shutil.rmtree(args.out / sub, ignore_errors=True)
        built = {}
        for name in only:
            shutil.rmtree(args.out / "refs" / name, ignore_errors=True)
            built[name] = build_source(LOADERS[name](), args.out)
            src = built[name]
            print(
                f"{name}: {src['n_frames']} frames, {len(src['shots'])} shots, "
                f"{len(src['appearances'])} appearances, "
                f"{sum(len(c['refs']) for c in src['characters'])} references"
            )
        sources = [built.get(n) or kept[n] for n in LOADERS if n in built or n in kept]
        truth = {"about": ABOUT, "sources": sources}
        truth_path.write_text(json.dumps(truth, separators=(",", ":")) + "\n")
    truth = json.loads(truth_path.read_text())
    if args.draw:
        draw_sheets(truth, args.out, args.draw, only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
