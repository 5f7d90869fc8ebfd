"""python -m bench.expand --output DIR [--count 100000]: a large collection made from cxr-xl, reproducibly: its images,
then seeded variants of each (crop, rotation, intensity, JPEG quality) that keep their patient id; every file its own
bytes (docs/performance.md, "100,000 images")."""
from __future__ import annotations

import hashlib
import io
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from bench.harness import CXR_XL, arguments
from bench.inputs import manifest_rows, write_manifest

COLUMNS = ("path", "label", "source", "patient_id", "view", "license", "url", "derived_from", "variant", "sha256")


def variant_bytes(data: bytes, key: str) -> bytes:
    """The JPEG bytes of one variant of an image (``data``), its changes drawn from ``key`` alone."""
    from PIL import Image, ImageOps, ImageStat

    rng = random.Random(key)
    image = Image.open(io.BytesIO(data))
    image = ImageOps.exif_transpose(image).convert("L")
    width, height = image.size
    box = (round(width * rng.uniform(0, 0.06)), round(height * rng.uniform(0, 0.06)),
           width - round(width * rng.uniform(0, 0.06)), height - round(height * rng.uniform(0, 0.06)))
    image = image.crop(box).resize((width, height), Image.BILINEAR)
    fill = int(ImageStat.Stat(image).mean[0])
    image = image.rotate(rng.uniform(-5, 5), resample=Image.BILINEAR, fillcolor=fill)
    brightness, contrast, gamma = rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1)
    mean = ImageStat.Stat(image).mean[0]

    def level(value: int) -> int:
        shifted = min(255.0, max(0.0, ((value - mean) * contrast + mean) * brightness))
        return round(255 * (shifted / 255) ** gamma)

    table = [level(v) for v in range(256)]
    image = image.point(table)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=rng.randint(88, 95))
    return out.getvalue()


def _write_one(args: tuple[str, str, dict, int, int, bool]) -> dict:
    source_dir, output, row, variant, seed, repeated = args
    with open(os.path.join(source_dir, row["path"]), "rb") as handle:
        data = handle.read()
    if variant or repeated:
        data = variant_bytes(data, f"{seed}:{row['path']}:{variant}")
    stem, _ = os.path.splitext(row["path"])
    relative = f"{stem}-v{variant:02d}.jpg"
    target = os.path.join(output, relative)
    tmp = target + ".tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, target)
    # every variant keeps its source's patient: its own id, or one made from its file name
    patient = row["patient_id"].strip() or "xl-" + os.path.splitext(os.path.basename(row["path"]))[0]
    return {**{k: row.get(k, "") for k in COLUMNS}, "path": relative, "patient_id": patient,
            "derived_from": row["path"], "variant": variant, "sha256": hashlib.sha256(data).hexdigest()}


def expand(source_dir: str, output: str, count: int, seed: int = 0, workers: int = 2) -> dict:
    """Write the collection (docs/performance.md, "100,000 images"); return counts for the log."""
    rows = sorted(manifest_rows(source_dir), key=lambda r: r["path"])
    seen, repeats = set(), set()
    for row in rows:  # byte-identical sources: every one after the first, in path order
        with open(os.path.join(source_dir, row["path"]), "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        (repeats if digest in seen else seen).add(row["path"] if digest in seen else digest)
    order = list(rows)
    random.Random(seed).shuffle(order)
    jobs = []
    for i in range(count):  # variant 0 of every source, in a seeded order, then variant 1 of every one, …
        row, variant = order[i % len(order)], i // len(order)
        jobs.append((source_dir, output, row, variant, seed, variant == 0 and row["path"] in repeats))
    for folder in sorted({os.path.dirname(r["path"]) for r in rows}):
        os.makedirs(os.path.join(output, folder), exist_ok=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        written = list(pool.map(_write_one, jobs, chunksize=256))
    hashes = {}
    for entry in written:
        if entry["sha256"] in hashes:
            raise RuntimeError(f"{entry['path']} has the same bytes as {hashes[entry['sha256']]}; change --seed")
        hashes[entry["sha256"]] = entry["path"]
    write_manifest(output, written, COLUMNS)
    return {"files": len(written), "sources": len(rows), "identical_sources": len(repeats),
            "variants": max(e["variant"] for e in written) + 1, "patients": len({e["patient_id"] for e in written}),
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> int:
    parser = arguments(__doc__, source=(CXR_XL, "a folder with manifest.csv"), count=(100_000, "files to write"),
                       seed=(0, "random seed"), workers=(os.cpu_count() or 1, "processes writing"))
    parser.add_argument("--output", required=True, help="the folder to write (outside the repository)")
    args = parser.parse_args(argv)
    if os.path.exists(os.path.join(args.output, "manifest.csv")):
        print(f"expand: {args.output} already holds a manifest.csv; remove the folder or choose another",
              file=sys.stderr)
        return 2
    done = expand(args.source, args.output, args.count, args.seed, args.workers)
    print(f"expand: {done['files']} files from {done['sources']} images ({done['variants']} variants at most; "
          f"{done['identical_sources']} source(s) byte-identical to another, their variant 0 changed too), "
          f"{done['patients']} patients, {done['seconds']} s → {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
