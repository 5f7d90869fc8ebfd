"""python -m bench.dup_bench [--total 100000] [--max-distance D] [--seed 0] [--hashes FILE.json]: banded
near-duplicate grouping against all-pairs on one thread; prints one JSON object (docs/performance.md, "Real data
at scale", 3)."""
from __future__ import annotations

import json
import logging
import os
import random
import time

from bench.harness import arguments, read_json, timed, usable_cpus
from bench.monitors import maxrss_mb
from covid_spark.config import load_config
from covid_spark.data.duplicates import group_duplicates, group_duplicates_all_pairs

logger = logging.getLogger(__name__)

ALL_PAIRS_MAX = 20_000
SYNTHETIC_BASE = 17_000   # about the size of cxr-xl
SYNTHETIC_CENTRES = 300
SYNTHETIC_SPREAD = 14     # members lie 0..14 bits from their centre
SYNTHETIC_UNIQUE = 0.2    # share of base hashes that belong to no cluster
COPY_FLIPS = 10           # copies lie 0..10 bits from their original


def _flip(value: int, count: int, bits: int, rng: random.Random) -> int:
    """``value`` with ``count`` distinct bits among the low ``bits`` flipped."""
    for bit in rng.sample(range(bits), min(count, bits)):
        value ^= 1 << bit
    return value


def synthetic_hashes(count: int = SYNTHETIC_BASE, seed: int = 0, bits: int = 256) -> dict[str, int]:
    """Clustered ``bits``-bit hashes: a fifth uniform, the rest near one of a few hundred centres."""
    rng = random.Random(seed)
    centres = [rng.getrandbits(bits) for _ in range(SYNTHETIC_CENTRES)]
    hashes = {}
    for i in range(count):
        if rng.random() < SYNTHETIC_UNIQUE:
            hashes[f"img{i:06d}"] = rng.getrandbits(bits)
        else:
            centre = rng.choice(centres)
            hashes[f"img{i:06d}"] = _flip(centre, rng.randint(0, SYNTHETIC_SPREAD), bits, rng)
    return hashes


def grow(base: dict[str, int], total: int, seed: int = 0) -> dict[str, int]:
    """``base`` plus seeded near-copies of its hashes (0..``COPY_FLIPS`` bits flipped), ``total`` in all."""
    rng = random.Random(seed)
    keys = sorted(base)
    if len(keys) >= total:
        return {k: base[k] for k in rng.sample(keys, total)}
    bits = max(1, max(v.bit_length() for v in base.values()))
    grown = dict(base)
    for i in range(total - len(keys)):
        original = rng.choice(keys)
        grown[f"copy{i:06d}"] = _flip(base[original], rng.randint(0, COPY_FLIPS), bits, rng)
    return grown


def bench_duplicates(real_hashes: dict[str, int] | None, total: int = 100_000, *,
                     max_distance: int, seed: int = 0) -> dict:
    """Banded grouping of ``total`` hashes timed, and checked against all-pairs (on at most ``ALL_PAIRS_MAX``)."""
    loadavg = list(os.getloadavg())
    hashes = grow(synthetic_hashes(seed=seed) if real_hashes is None else real_hashes, total, seed)
    cpu_started = time.process_time()
    seconds, groups = timed(group_duplicates, hashes, max_distance)
    cpu_seconds = time.process_time() - cpu_started
    logger.info("banded: %d hashes in %.2f s, %d groups", len(hashes), seconds, len(groups))
    checked, banded_same_set, banded_seconds_same_set = hashes, groups, seconds
    if len(hashes) > ALL_PAIRS_MAX:
        checked = {k: hashes[k] for k in random.Random(seed).sample(sorted(hashes), ALL_PAIRS_MAX)}
        banded_seconds_same_set, banded_same_set = timed(group_duplicates, checked, max_distance)
    all_pairs_seconds, reference = timed(group_duplicates_all_pairs, checked, max_distance)
    logger.info("all-pairs: %d hashes in %.2f s", len(checked), all_pairs_seconds)
    return {"n": len(hashes), "seconds_banded": round(seconds, 3), "cpu_seconds_banded": round(cpu_seconds, 3),
            "groups": len(groups), "largest_group": max((len(g) for g in groups), default=0),
            "all_pairs_checked_n": len(checked), "all_pairs_seconds": round(all_pairs_seconds, 3),
            "banded_seconds_same_set": round(banded_seconds_same_set, 3),
            "same_groups_as_all_pairs": banded_same_set == reference,
            "base": "synthetic" if real_hashes is None else f"{len(real_hashes)} given hashes",
            "bits": max(v.bit_length() for v in hashes.values()), "max_distance": max_distance, "loadavg": loadavg}


def read_hashes(paths: list[str]) -> dict[str, int]:
    """The hashes of JSON files of key → hash (an int or a decimal string), merged."""
    hashes = {}
    for path in paths:
        hashes.update({key: int(value) for key, value in read_json(path).items()})
    return hashes


def on_one_cpu(hash_files: list[str], total: int, max_distance: int) -> dict:
    """:func:`bench_duplicates` on the hashes in ``hash_files``, this process pinned to one CPU."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    hashes = read_hashes(hash_files)
    result = bench_duplicates(hashes, total=total, max_distance=max_distance, seed=0)
    return {"real_hashes": len(hashes), "result": dict(result, maxrss_mb=maxrss_mb(), cpus=usable_cpus())}


def main(argv=None) -> int:
    parser = arguments("Time banded near-duplicate grouping against all-pairs.", total=(100_000, "hashes to group"),
                       max_distance=(int(load_config()["preprocess"]["duplicate_distance"]),
                                     "Hamming distance (preprocess.duplicate_distance)"), seed=(0, "random seed"),
                       hashes=(None, "JSON object key -> hash (int or decimal string): the base, not synthetic hashes"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    real = read_hashes([args.hashes]) if args.hashes else None
    result = bench_duplicates(real, total=args.total, max_distance=args.max_distance, seed=args.seed)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
