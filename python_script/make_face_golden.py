"""Write test/models/data/faces_golden.json: what face_recognition 1.3 returns on
../shared/testdata, so test/models/test_dlib_faces.py can check diffusion_bunny.models.dlib_faces
against it after face_recognition is gone. Run once, with a Python that has face_recognition
(it was run in the checkout's venv before the switch):

    PYTHONPATH=src OLD_VENV/bin/python python_script/make_face_golden.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = (
    Path(os.environ.get("DIFFUSION_BUNNY_TESTDATA", ROOT.parent / "shared" / "testdata"))
    / "face_recognition_examples"
)
OUT = ROOT / "test" / "models" / "data" / "faces_golden.json"


def main(argv: list[str] | None = None) -> int:
    # argparse so that --help only shows help: a bare run rewrites the golden file the tests read.
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.parse_args(argv)
    if not EXAMPLES.is_dir():
        print(f"error: {EXAMPLES} is missing: the golden file is made from its pictures", file=sys.stderr)
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import face_recognition as fr
        except ImportError:
            print(
                "error: face_recognition is not installed: run this with a Python that has it (see --help)",
                file=sys.stderr,
            )
            return 2
    from importlib.metadata import version

    doc: dict = {
        "face_recognition": version("face_recognition"),
        "dlib": __import__("dlib").__version__,
        "images": {},
    }
    for path in sorted(EXAMPLES.rglob("*")):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        rel = str(path.relative_to(EXAMPLES))
        img = fr.load_image_file(path)
        boxes = fr.face_locations(img, 1, "hog")
        entry = {
            "hog1": [list(b) for b in boxes],
            "hog0": [list(b) for b in fr.face_locations(img, 0, "hog")],
            "large": [e.tolist() for e in fr.face_encodings(img, boxes, 1, "large")],
        }
        if rel == "obama.jpg":
            entry["small"] = [e.tolist() for e in fr.face_encodings(img, boxes, 1, "small")]
            entry["large_jitter3"] = [e.tolist() for e in fr.face_encodings(img, boxes, 3, "large")]
            entry["landmarks_large"] = [
                {k: [list(p) for p in v] for k, v in d.items()}
                for d in fr.face_landmarks(img, boxes, "large")
            ]
            entry["landmarks_small"] = [
                {k: [list(p) for p in v] for k, v in d.items()}
                for d in fr.face_landmarks(img, boxes, "small")
            ]
        if rel == "alex-lacamoire.png":
            entry["cnn0"] = [list(b) for b in fr.face_locations(img, 0, "cnn")]
        doc["images"][rel] = entry
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc) + "\n")
    print(f"{OUT}: {len(doc['images'])} images, {OUT.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
