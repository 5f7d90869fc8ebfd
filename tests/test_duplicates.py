"""covid_spark.data.duplicates: dHash, the union-find, and banded near-duplicate grouping
(group_duplicates) against known groups and all-pairs."""
from __future__ import annotations

import inspect
import io
import itertools
import json
import random
import time

import numpy as np
import pytest
from PIL import Image

from bench.dup_bench import bench_duplicates
from bench.dup_bench import main as dup_bench_main
from covid_spark.config import load_config
from covid_spark.data import duplicates
from covid_spark.data.duplicates import (
    HASH_SIZE,
    _band_values,
    _bands,
    _interleave,
    _union_run,
    components,
    dhash,
    extend_groups,
    group_duplicates,
    group_duplicates_all_pairs,
    hamming,
    near_copies,
)
from covid_spark.inputs.images import decode_image
from tests.imaging import encode, smooth_noise

CONFIGURED_DISTANCE = int(load_config()["preprocess"]["duplicate_distance"])


def flip(value: int, bits) -> int:
    """``value`` with the given bit positions flipped."""
    for bit in bits:
        value ^= 1 << bit
    return value


def spread_bits(count: int, width: int, pieces: int, rng: random.Random, dealt: bool) -> list[int]:
    """``count`` bit positions in ``count`` different ones of ``pieces`` classes of bits.

    The classes are equal slices of ``width`` bits, or (``dealt``) the bits with one
    remainder modulo ``pieces``, as group_duplicates' bands are. With ``pieces =
    max_distance + 1`` this is the hard case for banding: the flips hit as many bands as
    possible, leaving only ``pieces - count`` bands equal.
    """
    chosen = rng.sample(range(pieces), count)
    if dealt:
        return [c + pieces * rng.randrange(width // pieces) for c in chosen]
    return [width * c // pieces + rng.randrange(max(1, width // pieces)) for c in chosen]


def brute_force(hashes: dict[str, int], max_distance: int) -> list[list[str]]:
    """Pure-Python pairs + a dict union-find: an implementation sharing nothing with the module."""
    parent = {k: k for k in hashes}

    def find(k):
        while parent[k] != k:
            k = parent[k]
        return k

    for a, b in itertools.combinations(hashes, 2):
        if (hashes[a] ^ hashes[b]).bit_count() <= max_distance:
            parent[find(a)] = find(b)
    groups: dict[str, list[str]] = {}
    for k in hashes:
        groups.setdefault(find(k), []).append(k)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def clustered(n: int, bits: int, centres: int, spread: int, seed: int) -> dict[str, int]:
    """A fifth uniform hashes, the rest ``0..spread`` bits from one of ``centres`` centres."""
    rng = random.Random(seed)
    middle = [rng.getrandbits(bits) for _ in range(centres)]
    hashes = {}
    for i in range(n):
        if rng.random() < 0.2:
            hashes[f"k{i:05d}"] = rng.getrandbits(bits)
        else:
            count = min(bits, rng.randint(0, spread))
            hashes[f"k{i:05d}"] = flip(rng.choice(middle), rng.sample(range(bits), count))
    return hashes


# ---------------------------------------------------------------- one definition of each number


def test_hash_size_and_duplicate_distance_are_defined_once():
    from covid_spark.stages import preprocess_tasks as preprocess

    assert HASH_SIZE == 16                      # 256-bit hashes, as the stored 64 hex digits say
    assert preprocess.HASH_SIZE is HASH_SIZE    # preprocess hashes with the library's size
    assert inspect.signature(dhash).parameters["hash_size"].default == HASH_SIZE
    # the duplicate distance has one default, the configured one: no library function has its own
    for function in (group_duplicates, group_duplicates_all_pairs, near_copies, bench_duplicates):
        assert inspect.signature(function).parameters["max_distance"].default is inspect.Parameter.empty
    assert CONFIGURED_DISTANCE == 10


def test_dup_bench_defaults_to_the_configured_distance(capsys):
    assert dup_bench_main(["--total", "300"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["max_distance"] == CONFIGURED_DISTANCE and result["same_groups_as_all_pairs"] is True


# ---------------------------------------------------------------- dhash and hamming


def test_dhash_of_gradients_is_all_ones_or_all_zeros():
    rising = np.tile(np.linspace(0, 255, 90).astype(np.uint8), (80, 1))
    assert dhash(np.stack([rising] * 3, axis=-1)) == 2 ** (HASH_SIZE * HASH_SIZE) - 1
    assert dhash(rising[:, ::-1].copy()) == 0
    assert dhash(np.stack([rising] * 3, axis=-1), hash_size=8) == 2 ** 64 - 1
    assert dhash(rising[:, :, None], hash_size=4) == 2 ** 16 - 1


def test_dhash_survives_jpeg_reencoding_and_separates_images():
    original = encode(Image.fromarray(smooth_noise(10, 256)), "PNG")
    reencoded = encode(Image.open(io.BytesIO(original)), "JPEG", quality=90)
    other = encode(Image.fromarray(smooth_noise(11, 256)), "PNG")
    h_original = dhash(decode_image(original))
    h_reencoded = dhash(decode_image(reencoded))
    h_other = dhash(decode_image(other))
    assert isinstance(h_original, int) and 0 <= h_original < 2 ** 256
    # at the configured distance the re-encoded copy is a duplicate and the other image is not
    # (measured: 0 and 126 bits of 256)
    assert hamming(h_original, h_reencoded) <= CONFIGURED_DISTANCE
    assert hamming(h_original, h_other) > 4 * CONFIGURED_DISTANCE


def test_dhash_rejects_wrong_input():
    with pytest.raises(ValueError, match="uint8"):
        dhash(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="hash_size must be >= 1"):
        dhash(np.zeros((8, 8), dtype=np.uint8), hash_size=0)


def test_hamming():
    assert hamming(0b1011, 0b0001) == 2
    assert hamming(0, 2 ** 64 - 1) == 64
    assert hamming(12345, 12345) == 0


# ---------------------------------------------------------------- union-find


def test_components_label_each_node_with_the_smallest_of_its_component():
    assert components(6, [4, 3, 5], [3, 0, 1]).tolist() == [0, 1, 2, 0, 0, 1]
    assert components(3, [], []).tolist() == [0, 1, 2]
    assert components(0, [], []).tolist() == []
    assert components(4, np.array([1, 2, 2]), np.array([1, 3, 3])).tolist() == [0, 1, 2, 2]  # loops, repeats
    with pytest.raises(ValueError, match="same length"):
        components(3, [0, 1], [2])


def test_components_match_a_dict_union_find_on_random_graphs():
    rng = np.random.default_rng(7)
    for n, edges in [(50, 30), (500, 400), (2000, 3000)]:
        u, v = rng.integers(0, n, edges), rng.integers(0, n, edges)
        parent = list(range(n))

        def find(i):
            while parent[i] != i:
                i = parent[i]
            return i

        for a, b in zip(u.tolist(), v.tolist()):
            ra, rb = find(a), find(b)
            parent[max(ra, rb)] = min(ra, rb)
        assert components(n, u, v).tolist() == [find(i) for i in range(n)]


# ---------------------------------------------------------------- bands


@pytest.mark.parametrize("width, max_distance", [(256, 10), (256, 0), (256, 1), (130, 2), (64, 10),
                                                 (8, 3), (200, 12), (1000, 5)])
def test_bands_cover_the_bits_with_enough_bands_of_at_most_64(width, max_distance):
    bands = _bands(width, max_distance)
    assert len(bands) >= max_distance + 1
    assert bands[0][0] == 0 and bands[-1][1] == width
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
    assert all(1 <= hi - lo <= 64 for lo, hi in bands)
    assert max(hi - lo for lo, hi in bands) - min(hi - lo for lo, hi in bands) <= 1


def test_sorted_keys_with_their_table_group_as_the_dict_does():
    rng = random.Random(11)
    base = [rng.getrandbits(256) for _ in range(60)]
    hashes = {f"k{i:03d}": h ^ (rng.getrandbits(8) if i % 3 else 0) for i, h in enumerate(base * 2)}
    hashes.update({"small0": 5, "small1": 7})  # hashes narrower than a word, as narrow tables have
    keys = sorted(hashes)
    table = np.array([[(hashes[k] >> (64 * w)) & ((1 << 64) - 1) for w in range(4)] for k in keys], dtype=np.uint64)
    for distance in (0, 3, 10):
        assert group_duplicates((keys, table), distance) == group_duplicates(hashes, distance)
    with pytest.raises(ValueError, match="sorted"):
        group_duplicates((keys[::-1], table), 3)


@pytest.mark.parametrize("rows_at_a_time", [8192, 7, 1])  # one chunk; chunks ending mid-table; one row each
def test_interleave_deals_bit_b_plus_k_times_count_into_band_b(monkeypatch, rows_at_a_time):
    monkeypatch.setattr(duplicates, "_INTERLEAVE_ROWS", rows_at_a_time)
    rng = random.Random(6)
    width, count = 200, 11
    values = [rng.getrandbits(width) for _ in range(40)] + [(1 << width) - 1, 1, 1 << (width - 1)]
    table = np.array([[(v >> (64 * w)) & ((1 << 64) - 1) for w in range(4)] for v in values],
                     dtype=np.uint64)
    dealt = _interleave(table, width, count)
    bands = _bands(width, count - 1)
    assert len(bands) == count
    for band, (lo, hi) in enumerate(bands):
        expected = [sum(((v >> bit) & 1) << j for j, bit in enumerate(range(band, width, count)))
                    for v in values]
        assert _band_values(dealt, lo, hi).tolist() == expected


def test_band_values_match_python_ints_across_word_boundaries():
    rng = random.Random(5)
    values = [rng.getrandbits(200) for _ in range(50)] + [(1 << 200) - 1, 0]
    table = np.array([[(v >> (64 * w)) & ((1 << 64) - 1) for w in range(4)] for v in values],
                     dtype=np.uint64)
    for lo, hi in [(0, 64), (60, 70), (64, 128), (100, 164), (190, 200), (5, 6), (127, 191)]:
        expected = [(v >> lo) & ((1 << (hi - lo)) - 1) for v in values]
        assert _band_values(table, lo, hi).tolist() == expected


# ---------------------------------------------------------------- known groups


@pytest.mark.parametrize("max_distance", [0, 1, 6, 10])
def test_planted_copies_join_up_to_max_distance_and_not_one_bit_beyond(max_distance):
    rng = random.Random(max_distance)
    hashes = {f"u{i:04d}": rng.getrandbits(256) | 1 << 255 for i in range(2000)}
    expected = []
    for i in range(20 * (max_distance + 2)):
        k = i % (max_distance + 2)  # 20 copies at each distance 0 .. max_distance + 1
        original = f"u{i:04d}"
        copy = f"u{i:04d}_copy{k}"
        hashes[copy] = flip(hashes[original], spread_bits(k, 256, max_distance + 1, rng, i % 2 == 0)
                            if k <= max_distance else rng.sample(range(256), k))
        if k <= max_distance:
            expected.append([original, copy])
    # uniform 256-bit hashes are ~128 bits apart: the planted pairs are the only groups
    assert group_duplicates(hashes, max_distance) == expected
    assert group_duplicates_all_pairs(hashes, max_distance) == expected


def test_one_flip_in_every_band_but_one_joins_and_in_every_band_does_not():
    # bands deal bit i to band i % 11; flips in 10 bands leave exactly one band to share
    d = 10
    rng = random.Random(1)
    base = rng.getrandbits(256) | 1 << 255
    for spared in range(d + 1):
        bits = [band + 11 * rng.randrange(23) for band in range(d + 1)]
        near = flip(base, bits[:spared] + bits[spared + 1:])
        far = flip(base, bits)
        assert (base ^ near).bit_count() == 10 and (base ^ far).bit_count() == 11
        assert group_duplicates({"base": base, "near": near}, d) == [["base", "near"]]
        assert group_duplicates({"base": base, "far": far}, d) == []


def test_chains_join_transitively():
    rng = random.Random(2)
    a = rng.getrandbits(256)
    bits = rng.sample(range(256), 60)
    b = flip(a, bits[:10])       # 10 from a
    c = flip(b, bits[10:20])     # 10 from b, 20 from a
    lone = flip(a, bits[20:60])  # 40 from a, 60 from c
    hashes = {"a": a, "b": b, "c": c, "lone": lone}
    assert group_duplicates(hashes, 10) == [["a", "b", "c"]]
    assert group_duplicates(hashes, 9) == []
    # a chain of 30 links, each 10 bits, in scrambled key order: one group
    chain, value = {}, a
    for i in range(30):
        value = flip(value, rng.sample(range(256), 10))
        chain[f"{rng.random():.12f}"] = value
    chain["start"] = a
    assert group_duplicates(chain, 10) == [sorted(chain)]


def test_same_small_contract_as_before():
    assert group_duplicates({}, 6) == []
    assert group_duplicates({"only": 5}, 6) == []
    assert group_duplicates({"y": 7, "x": 7}, 6) == [["x", "y"]]
    assert group_duplicates({"y": 0, "x": 0}, max_distance=0) == [["x", "y"]]
    # no two 3-bit hashes are more than 3 apart
    assert group_duplicates({"a": 0, "b": 7, "c": 5}, max_distance=3) == [["a", "b", "c"]]
    assert group_duplicates({"a": 0, "b": 7, "c": 5}, max_distance=2) == [["a", "b", "c"]]
    assert group_duplicates({"a": 0, "b": 7, "c": 6}, max_distance=1) == [["b", "c"]]


def test_components_and_chains_of_64_bit_hashes():
    hashes = {
        "z_far": 0x0000_FFFF_FFFF_0000,
        "c": 0b1_1111_1111,            # 6 bits from b, 9 from a: joins a's group via b
        "a": 0,
        "b": 0b111,                    # 3 bits from a
        "e": 0xFFFF_0000_0000_0001,    # 1 bit from d
        "d": 0xFFFF_0000_0000_0000,
    }
    assert group_duplicates(hashes, 6) == [["a", "b", "c"], ["d", "e"]]
    assert group_duplicates(hashes, max_distance=3) == [["a", "b"], ["d", "e"]]
    assert group_duplicates(hashes, max_distance=0) == []


def test_two_keys_join_through_a_middle_one():
    # a and b are 12 bits apart; m is 6 from each, so all three are one component.
    # Both edges land on m in the same pass, which a naive one-shot union would split.
    hashes = {"a": 0, "b": 0b1111_1111_1111, "m": 0b11_1111}
    assert group_duplicates(hashes, 6) == [["a", "b", "m"]]
    hashes["n"] = 0b1111_1111_1111 << 40  # far from everything
    assert group_duplicates(hashes, 6) == [["a", "b", "m"]]


# ---------------------------------------------------------------- against all-pairs


@pytest.mark.parametrize("max_distance", [0, 1, 6, 10])
def test_clustered_256_bit_matches_brute_force(max_distance):
    hashes = clustered(400, 256, centres=8, spread=14, seed=max_distance)
    expected = brute_force(hashes, max_distance)
    assert any(len(g) >= 3 for g in expected)  # there are chains to get right
    assert group_duplicates(hashes, max_distance) == expected


@pytest.mark.parametrize("max_distance", [0, 1, 6, 10])
def test_clustered_with_copies_matches_all_pairs(max_distance):
    hashes = clustered(3000, 256, centres=40, spread=14, seed=10 + max_distance)
    rng = random.Random(max_distance)
    keys = sorted(hashes)
    for i in range(1500):
        hashes[f"copy{i:04d}"] = flip(hashes[rng.choice(keys)], rng.sample(range(256), rng.randint(0, 10)))
    expected = group_duplicates_all_pairs(hashes, max_distance)
    assert len(expected) > 50
    assert group_duplicates(hashes, max_distance) == expected


@pytest.mark.parametrize("bits, max_distance", [(64, 10), (64, 0), (64, 3), (130, 1), (100, 4)])
def test_other_widths_match_all_pairs(bits, max_distance):
    hashes = clustered(2000, bits, centres=30, spread=8, seed=bits + max_distance)
    expected = group_duplicates_all_pairs(hashes, max_distance)
    assert len(expected) > 10
    assert group_duplicates(hashes, max_distance) == expected


@pytest.mark.parametrize("max_distance", [0, 1, 3, 7, 8, 20])
def test_8_bit_hashes_match_brute_force(max_distance):
    rng = random.Random(max_distance)
    hashes = {f"b{i:03d}": rng.getrandbits(8) for i in range(300)}
    expected = brute_force(hashes, max_distance)
    assert group_duplicates(hashes, max_distance) == expected
    if max_distance >= 8:
        assert expected == [sorted(hashes)]


def clustered_hashes(rng: np.random.Generator, n: int, bits: int) -> dict[str, int]:
    """Random hashes, a third of them near-copies (a few flipped bits) of earlier ones."""
    hashes: dict[str, int] = {}
    values: list[int] = []
    for i in range(n):
        if values and rng.random() < 0.35:
            value = values[rng.integers(len(values))]
            for bit in rng.choice(bits, size=int(rng.integers(0, 6)), replace=False):
                value ^= 1 << int(bit)
        else:
            value = int.from_bytes(rng.bytes(bits // 8), "big")
        values.append(value)
        hashes[f"img{i:05d}"] = value
    return hashes


@pytest.mark.parametrize("bits", [64, 256])
def test_near_copies_of_earlier_hashes_match_brute_force(bits):
    hashes = clustered_hashes(np.random.default_rng(bits), 300, bits)
    expected = brute_force(hashes, 6)
    assert any(len(g) >= 3 for g in expected)  # the data has chains worth testing
    assert group_duplicates(hashes, 6) == expected


def test_is_fast_for_10k_64_bit_hashes():
    rng = np.random.default_rng(0)
    hashes = {f"k{i:05d}": int(v) for i, v in
              enumerate(rng.integers(0, 2 ** 63, 10_000, dtype=np.int64))}
    hashes["k00000_copy"] = hashes["k00000"] ^ 0b101
    hashes["k09999_copy"] = hashes["k09999"]
    started = time.perf_counter()
    groups = group_duplicates(hashes, 6)
    elapsed = time.perf_counter() - started
    assert ["k00000", "k00000_copy"] in groups and ["k09999", "k09999_copy"] in groups
    assert elapsed < 10.0, f"took {elapsed:.1f}s"


# ---------------------------------------------------------------- big buckets


def test_one_big_bucket_of_identical_hashes_and_neighbours():
    rng = random.Random(3)
    blank = rng.getrandbits(256)
    hashes = {f"blank{i:04d}": blank for i in range(3000)}
    near = {f"near{i:03d}": flip(blank, rng.sample(range(256), rng.randint(1, 10))) for i in range(300)}
    far = {f"far{i:03d}": flip(blank, rng.sample(range(256), 40)) for i in range(100)}
    hashes.update(near)
    hashes.update(far)
    groups = group_duplicates(hashes, 10)
    big = sorted([k for k in hashes if not k.startswith("far")])
    assert groups[0] == big  # "blank..." sorts first
    assert all(set(g) <= set(far) for g in groups[1:])  # far ones may pair among themselves only
    assert groups == group_duplicates_all_pairs(hashes, 10)


def test_big_bucket_of_distinct_near_identical_hashes():
    rng = random.Random(4)
    centre = rng.getrandbits(256)
    hashes = {f"n{i:04d}": flip(centre, rng.sample(range(256), rng.randint(0, 3))) for i in range(3000)}
    # every pair is within 6 bits: one group, whatever the order of the work
    assert group_duplicates(hashes, 6) == [sorted(hashes)]
    assert group_duplicates(hashes, 2) == group_duplicates_all_pairs(hashes, 2)


def test_big_bucket_that_shares_bands_but_is_far_apart():
    # 800 hashes equal on the bits of 5 of the 11 bands (bits i with i % 11 < 5) and random
    # on the rest: every pair is a candidate in those bands, but pairs are ~70 bits apart;
    # only the planted pairs are close
    rng = random.Random(5)
    shared = sum(1 << i for i in range(256) if i % 11 < 5)
    common = rng.getrandbits(256) & shared
    hashes = {f"h{i:03d}": rng.getrandbits(256) & ~shared | common | 1 << 255 for i in range(800)}
    expected = []
    for i in range(0, 800, 100):
        hashes[f"h{i:03d}_near"] = flip(hashes[f"h{i:03d}"], rng.sample(range(255), 10))
        expected.append([f"h{i:03d}", f"h{i:03d}_near"])
    assert group_duplicates(hashes, 10) == expected


def test_union_run_only_stops_when_every_member_left_is_joined():
    rng = random.Random(8)
    a, b = rng.getrandbits(256), rng.getrandbits(256)
    values = ([flip(a, rng.sample(range(256), 2)) for _ in range(300)]
              + [flip(b, rng.sample(range(256), 2)) for _ in range(300)]
              + [flip(a, range(8))])  # 8 bits from a, 6..10 from each of a's cluster
    table = np.array([[(v >> (64 * w)) & ((1 << 64) - 1) for w in range(4)] for v in values],
                     dtype=np.uint64)
    parent = np.arange(len(values), dtype=np.int64)
    parent[1:300], parent[301:600] = 0, 300  # each cluster already joined: 3 components
    _union_run(table, np.arange(len(values)), 10, parent)
    roots = parent.tolist()
    assert roots[600] == roots[0] != roots[300]
    assert set(roots) == {roots[0], roots[300]}


# ---------------------------------------------------------------- errors and bench


def _split_off(hashes: dict[str, int], fraction: float, seed: int) -> tuple[dict[str, int], dict[str, int]]:
    """``hashes`` cut in two at random: (stored, new)."""
    rng = random.Random(seed)
    new = set(rng.sample(sorted(hashes), round(len(hashes) * fraction)))
    return {k: v for k, v in hashes.items() if k not in new}, {k: v for k, v in hashes.items() if k in new}


@pytest.mark.parametrize("bits, max_distance, fraction", [(256, 10, 0.01), (256, 10, 0.3), (256, 0, 0.1),
                                                          (256, 6, 0.5), (64, 10, 0.1), (64, 3, 0.2), (8, 0, 0.2)])
def test_extend_groups_equals_grouping_everything_again(bits, max_distance, fraction):
    hashes = clustered(2000, bits, centres=30, spread=14, seed=bits + max_distance)
    keys = sorted(hashes)
    rng = random.Random(max_distance)
    for i in range(300):  # identical copies, stored and new, and near-copies bridging stored groups
        hashes[f"copy{i:04d}"] = flip(hashes[rng.choice(keys)], rng.sample(range(bits), rng.randint(0, 2)))
    stored, new = _split_off(hashes, fraction, seed=bits)
    expected = group_duplicates(hashes, max_distance)
    assert len(expected) > 10
    assert extend_groups(group_duplicates(stored, max_distance), stored, new, max_distance) == expected


def test_extend_groups_edge_cases():
    assert extend_groups([["a", "b"]], {"a": 1, "b": 1, "c": 9}, {}, 3) == [["a", "b"]]
    assert extend_groups([], {}, {"a": 1}, 3) == []
    assert extend_groups([], {}, {"a": 1, "b": 1}, 0) == [["a", "b"]]                      # identical new hashes
    assert extend_groups([["a", "c"]], {"a": 0, "c": 1}, {"b": 3, "d": 255}, 1) == [["a", "b", "c"]]
    assert extend_groups([], {"a": 0}, {"b": 7}, 5) == [["a", "b"]]                       # every pair close
    assert extend_groups([], {"a": 0, "x": 2**200}, {"b": 2**200 + 1}, 1) == [["b", "x"]]
    with pytest.raises(ValueError, match="max_distance must be >= 0"):
        extend_groups([], {"a": 1}, {}, -1)


@pytest.mark.parametrize("function", [group_duplicates, group_duplicates_all_pairs])
def test_errors(function):
    with pytest.raises(ValueError, match="max_distance must be >= 0, got -1"):
        function({"a": 1, "b": 2}, max_distance=-1)
    with pytest.raises(ValueError, match="max_distance must be >= 0"):
        function({}, max_distance=-3)
    with pytest.raises(ValueError, match="hashes must be non-negative integers"):
        function({"a": 1, "b": -2}, max_distance=3)


def test_bench_duplicates_small():
    result = bench_duplicates(None, total=3000, max_distance=10, seed=1)
    assert result["n"] == 3000 and result["all_pairs_checked_n"] == 3000
    assert result["same_groups_as_all_pairs"] is True
    assert result["groups"] > 0 and result["seconds_banded"] >= 0
    given = {f"r{i}": v for i, v in enumerate(clustered(500, 256, 10, 6, seed=2).values())}
    result = bench_duplicates(given, total=1000, max_distance=6)
    assert result["n"] == 1000 and result["same_groups_as_all_pairs"] is True


# ---------------------------------------------------------------- near copies across two sets


def test_near_copies_against_brute_force():
    rng = random.Random(11)
    reference = clustered(600, 256, centres=40, spread=12, seed=11)
    queries = {}
    keys = sorted(reference)
    for i in range(400):
        kind = i % 4
        if kind == 0:    # a near copy, 0..10 bits away
            value = flip(reference[rng.choice(keys)], rng.sample(range(256), rng.randint(0, 10)))
        elif kind == 1:  # just outside: 11 bits from one reference (maybe closer to another)
            value = flip(reference[rng.choice(keys)], rng.sample(range(256), 11))
        else:
            value = rng.getrandbits(256)
        queries[f"q{i:03d}"] = value
    found = near_copies(reference, queries, 10)
    expected = {q for q, h in queries.items()
                if any(bin(h ^ r).count("1") <= 10 for r in reference.values())}
    assert set(found) == expected and len(expected) >= 100
    for q, r in found.items():
        assert bin(queries[q] ^ reference[r]).count("1") <= 10


def test_near_copies_is_not_transitive_and_handles_edge_cases():
    a = 0
    b = (1 << 6) - 1            # 6 bits from a
    c = ((1 << 12) - 1)          # 12 bits from a, 6 from b
    assert near_copies({"ref": a}, {"b": b, "c": c}, 6) == {"b": "ref"}
    assert near_copies({"ref": a}, {"c": c}, 0) == {}
    assert near_copies({"r1": c, "r2": c}, {"x": c}, 0) == {"x": "r1"}  # identical references: one lookup
    assert near_copies({}, {"x": 1}, 3) == {} and near_copies({"r": 1}, {}, 3) == {}
    assert near_copies({"r": 0b1010}, {"x": 0b0101}, 4) == {"x": "r"}    # distance >= width
    with pytest.raises(ValueError, match="max_distance must be >= 0"):
        near_copies({"r": 1}, {"x": 1}, -1)
