import random

import numpy as np

from loraflow.data.minhash import NearDuplicates, _SortedRuns, _Words, estimate, signatures

WORDS = [f"w{i}" for i in range(3000)]


def doc(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(n)]


def edited(words: list[str], rng: random.Random, changes: int) -> list[str]:
    words = list(words)
    for _ in range(changes):
        words[rng.randrange(len(words))] = rng.choice(WORDS)
    return words


def jaccard(a: list[str], b: list[str]) -> float:
    x, y = ({tuple(w[i : i + 3]) for i in range(len(w) - 2)} for w in (a, b))
    return len(x & y) / len(x | y)


def first_seen(near: NearDuplicates, docs: list[list[str]]) -> list[tuple[str, float] | None]:
    """Run docs through the index as validation does (one chunk), keeping the unmatched."""
    near.check_chunk([" ".join(d) for d in docs])
    found = []
    for i in range(len(docs)):
        found.append(near.match(i))
        if found[-1] is None:
            near.keep(i, "data.jsonl", i + 1)
    near.commit()
    return found


def test_pairs_over_the_threshold_are_found_and_pairs_under_it_are_not():
    rng = random.Random(0)
    originals = [doc(rng, rng.randint(60, 200)) for _ in range(150)]
    near = NearDuplicates(0.8)
    assert first_seen(near, originals) == [None] * 150  # unrelated texts: nothing matched
    close = [edited(d, rng, 1) for d in originals[:75]]  # one word in 60-200: similarity >= 0.9
    far = [edited(d, rng, max(6, len(d) // 8)) for d in originals[75:]]  # similarity <= 0.7
    assert min(jaccard(a, b) for a, b in zip(originals, close, strict=False)) >= 0.9
    assert max(jaccard(a, b) for a, b in zip(originals[75:], far, strict=True)) <= 0.7
    found = first_seen(near, close + far)
    assert [f[0] if f else None for f in found[:75]] == [f"data.jsonl:{i + 1}" for i in range(75)]
    assert found[75:] == [None] * 75


def test_the_similarity_estimate_follows_the_jaccard_similarity():
    rng = random.Random(1)
    gaps = []
    for changes in (1, 2, 4, 8, 16, 32):
        for _ in range(10):
            a = doc(rng, 150)
            b = edited(a, rng, changes)
            ours = signatures([" ".join(a), " ".join(b)], _Words())
            gaps.append(abs(estimate(ours[0], ours[1]) - jaccard(a, b)))
    assert float(np.mean(gaps)) < 0.05 and max(gaps) < 0.2


def test_short_texts_match_only_their_exact_copies():
    near = NearDuplicates(0.85)
    found = first_seen(near, [["a", "b"], ["a", "c"], ["a", "b"], ["x"], ["x"], []])
    assert found[:2] == [None, None] and found[2][0] == "data.jsonl:1"
    assert found[4][0] == "data.jsonl:4"


def test_sorted_runs_find_keys_across_merged_runs():
    runs = _SortedRuns()
    for start in range(0, 100, 7):  # runs of 7 keys, merged as they double
        keys = np.arange(start, min(start + 7, 100), dtype=np.uint64) * np.uint64(2**40)
        runs.add(keys, np.arange(start, start + len(keys)))
    assert len(runs.runs) < 6
    probe = np.array([5, 99, 100, 0], dtype=np.uint64) * np.uint64(2**40)
    assert runs.find(probe).tolist() == [5, 99, -1, 0]
