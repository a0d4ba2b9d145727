"""Tests for trainers.data: loaders (exact matrices, exact errors), InteractionData, synthetic."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402

from trainers import data as D  # noqa: E402
from trainers.evaluation import evaluate_full_ranking  # noqa: E402


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def dense(matrix) -> list:
    return matrix.toarray().astype(int).tolist()


def csr(rows) -> sp.csr_matrix:
    return sp.csr_matrix(np.array(rows, dtype=np.float32))


# ---------------------------------------------------------------------------------------
# LightGCN directories


@pytest.fixture
def lightgcn_dir(tmp_path):
    root = tmp_path / "toy"
    # user 1 has a line without items; user 3 appears only in test (cold); tabs, CRLF and
    # blank lines are tolerated; user 0 is listed twice in train and item 2 repeated.
    write(root / "train.txt", "0 1 2\r\n1\n\n2\t0 3 3\n0 2 4\n")
    write(root / "valid.txt", "0 0\n2 4\n")
    write(root / "test.txt", "0 3\n2 1 2\n3 4\n")
    return root


def test_lightgcn_exact_matrices(lightgcn_dir):
    data = D.load_lightgcn_dir(lightgcn_dir)
    assert (data.num_users, data.num_items, data.name) == (4, 5, "toy")
    assert data.user_ids is None and data.item_ids is None
    assert dense(data.train) == [[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 1, 0], [0, 0, 0, 0, 0]]
    assert dense(data.valid) == [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]]
    assert dense(data.test) == [[0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]]
    for matrix in (data.train, data.valid, data.test):
        assert matrix.dtype == np.float32 and matrix.has_canonical_format
    stats = data.stats()
    assert stats["duplicates_removed"] == 2  # "0 2" twice for user 0, "3" twice for user 2
    assert stats["overlaps_removed"] == 0
    assert (stats["num_train"], stats["num_valid"], stats["num_test"]) == (5, 2, 4)
    assert (stats["users_without_train"], stats["cold_test_users"], stats["test_users"]) == (2, 1, 2)
    assert (stats["cold_valid_users"], stats["valid_users"]) == (0, 2)
    assert data.eval_users("test").tolist() == [0, 2]
    assert data.eval_users("valid").tolist() == [0, 2]


def test_lightgcn_optional_files_and_overlap_warning(tmp_path):
    root = tmp_path / "d"
    write(root / "train.txt", "0 0 1\n1 2\n")
    only_train = D.load_lightgcn_dir(root)
    assert only_train.valid.nnz == 0 and only_train.test.nnz == 0
    assert only_train.valid.shape == (2, 3)
    write(root / "test.txt", "0 1 2\n1 0\n")
    with pytest.warns(UserWarning, match="dropped 1 pairs"):
        data = D.load_lightgcn_dir(root)
    assert dense(data.test) == [[0, 0, 1], [1, 0, 0]]
    assert data.stats()["overlaps_removed"] == 1


@pytest.mark.parametrize(
    "content, line, problem",
    [
        ("0 1 2\n" * 16 + "5 x3 4\n", 17, "bad token 'x3'"),
        ("0 1\n1 -2\n", 2, "negative id -2"),
        ("0 1\n-1 2\n", 2, "negative id -1"),
        ("0 1.5\n", 1, "bad token '1.5'"),
        ("0 1\n\n3 1e3\n", 3, "bad token '1e3'"),
        ("0 1,2\n", 1, "bad token '1,2'"),
        ("", 1, "empty file (expected lines 'user_id item_id item_id ...')"),
        (" \n\n", 1, "empty file (expected lines 'user_id item_id item_id ...')"),
        ("0 1\n1 2147483647\n", 2, "id 2147483647 out of range (max 2147483646)"),
        ("0 99999999999999999999\n", 1, "id 99999999999999999999 out of range (max 2147483646)"),
    ],
)
def test_lightgcn_errors_name_file_and_line(tmp_path, content, line, problem):
    root = tmp_path / "gowalla"
    write(root / "train.txt", content)
    with pytest.raises(ValueError) as err:
        D.load_lightgcn_dir(root)
    assert str(err.value) == f"{root / 'train.txt'}:{line}: {problem}"


def test_lightgcn_error_in_test_file(tmp_path):
    root = tmp_path / "d"
    write(root / "train.txt", "0 1\n")
    write(root / "test.txt", "0 2\n1 3 q\n")
    with pytest.raises(ValueError, match=r"test\.txt:2: bad token 'q'$"):
        D.load_lightgcn_dir(root)


def test_lightgcn_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        D.load_lightgcn_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train.txt: no such file"):
        D.load_lightgcn_dir(tmp_path / "empty")


def test_lightgcn_users_only(tmp_path):
    root = tmp_path / "d"
    write(root / "train.txt", "0\n1\n")
    with pytest.raises(ValueError, match=r"train\.txt:1: no interactions in any file"):
        D.load_lightgcn_dir(root)


# ---------------------------------------------------------------------------------------
# Triplets and MovieLens


def test_triplets_string_ids_min_rating_and_duplicates(tmp_path):
    path = write(
        tmp_path / "ratings.tsv",
        "bob\tm2\t5\nalice\tm1\t4\nalice\tm2\t2\n\ncarol\tm3\t1\nalice\tm1\t5\nbob\tm1\t4.5\n",
    )
    data = D.load_triplets(path, min_rating=4, valid_fraction=0, test_fraction=0)
    assert data.user_ids.tolist() == ["alice", "bob"]  # carol has no positive
    assert data.item_ids.tolist() == ["m1", "m2"]  # m3 has no positive
    assert dense(data.train) == [[1, 0], [1, 1]]
    assert data.name == "ratings"
    assert data.stats()["duplicates_removed"] == 1
    assert data.stats()["below_min_rating"] == 2


def test_triplets_integer_ids_map_numerically(tmp_path):
    path = write(tmp_path / "r.txt", "10 7\n9 007\n10 100\n")
    data = D.load_triplets(path, valid_fraction=0, test_fraction=0)
    assert data.user_ids.tolist() == [9, 10]
    assert data.item_ids.tolist() == [7, 100]  # "7" and "007" are the same item
    assert dense(data.train) == [[1, 0], [1, 1]]
    assert data.user_ids.dtype == np.int64


def test_triplets_separator_and_header(tmp_path):
    path = write(tmp_path / "r.csv", "userId,movieId,rating\nu1, a ,3\nu2,b,4\n")
    data = D.load_triplets(path, sep=",", header=True, valid_fraction=0, test_fraction=0)
    assert data.item_ids.tolist() == ["a", "b"]
    assert dense(data.train) == [[1, 0], [0, 1]]


def test_triplets_random_split_rules(tmp_path):
    rng = np.random.default_rng(5)
    lines = []
    sizes = {"u1": 10, "u2": 1, "u3": 2, "u4": 3, "u5": 25}
    for user, n in sizes.items():
        for item in rng.choice(60, size=n, replace=False):
            lines.append(f"{user} i{item}")
    rng.shuffle(lines)
    path = write(tmp_path / "r.txt", "\n".join(lines) + "\n")
    data = D.load_triplets(path, valid_fraction=0.1, test_fraction=0.2, seed=3)
    per_user = np.stack([np.diff(m.indptr) for m in (data.train, data.valid, data.test)], axis=1)
    # n=10: 2 test, 1 valid; n=1: train only; n=2: 0 test (0.4 rounds down), 0 valid;
    # n=3: 1 test (0.6 rounds up), 0 valid; n=25: 5 test, 3 valid (2.5 rounds up).
    assert per_user.tolist() == [[7, 1, 2], [1, 0, 0], [2, 0, 0], [2, 0, 1], [17, 3, 5]]
    union = data.train + data.valid + data.test
    assert union.max() == 1 and union.nnz == sum(sizes.values())
    # Same seed and shuffled lines -> same split; other seed -> different split.
    path2 = write(tmp_path / "r2.txt", "\n".join(reversed(lines)) + "\n")
    again = D.load_triplets(path2, valid_fraction=0.1, test_fraction=0.2, seed=3)
    assert (again.test != data.test).nnz == 0 and (again.valid != data.valid).nnz == 0
    other = D.load_triplets(path, valid_fraction=0.1, test_fraction=0.2, seed=4)
    assert (other.test != data.test).nnz > 0


def test_triplets_every_user_keeps_a_training_item(tmp_path):
    path = write(tmp_path / "r.txt", "a x\na y\nb x\n")
    data = D.load_triplets(path, valid_fraction=0.45, test_fraction=0.5)
    assert np.diff(data.train.indptr).tolist() == [1, 1]
    assert data.test.nnz + data.valid.nnz == 1


def test_triplets_temporal_split(tmp_path):
    path = write(tmp_path / "r.txt", "u a 5 30\nu b 5 10\nu c 5 20\nu d 5 40\nu e 5 50\n")
    data = D.load_triplets(path, valid_fraction=0.2, test_fraction=0.2, split="temporal")
    assert dense(data.test) == [[0, 0, 0, 0, 1]]  # newest: e (t=50)
    assert dense(data.valid) == [[0, 0, 0, 1, 0]]  # next: d (t=40)
    assert dense(data.train) == [[1, 1, 1, 0, 0]]


@pytest.mark.parametrize(
    "content, kwargs, message",
    [
        ("a x 5\nb y\n", {}, ":2: expected 3 fields like line 1, got 'b y'"),
        ("a x 5\nb\n", {}, ":2: expected 3 fields like line 1, got 'b'"),
        ("\na\n", {}, ":2: expected 'user item [rating [timestamp]]', got 'a'"),
        ("a x 5\nb y five\n", {}, ":2: bad rating 'five'"),
        ("a x 5 100\nb y 4 noon\n", {}, ":2: bad timestamp 'noon'"),
        ("a x\nb y\n", {"min_rating": 3}, ":1: no rating field (min_rating=3 needs 'user item rating')"),
        ("a x 5\n", {"split": "temporal"}, ":1: no timestamp field (split='temporal' needs 'user item rating timestamp')"),
        ("a x 1\nb y 2\n", {"min_rating": 3}, ":1: no rating >= 3 in the file"),
        ("", {}, ":1: empty file (expected lines 'user item [rating [timestamp]]')"),
        ("\n  \n", {}, ":1: empty file (expected lines 'user item [rating [timestamp]]')"),
    ],
)
def test_triplets_errors(tmp_path, content, kwargs, message):
    path = write(tmp_path / "r.txt", content)
    with pytest.raises(ValueError) as err:
        D.load_triplets(path, **kwargs)
    assert str(err.value) == f"{path}{message}"


def test_triplets_empty_field_with_separator(tmp_path):
    path = write(tmp_path / "r.csv", "a,x,5\nb,,4\n")
    with pytest.raises(ValueError) as err:
        D.load_triplets(path, sep=",")
    assert str(err.value) == f"{path}:2: expected 3 fields like line 1, got 'b,,4'"


def test_split_argument_checks(tmp_path):
    path = write(tmp_path / "r.txt", "a x\n")
    with pytest.raises(ValueError, match="split must be 'random' or 'temporal'"):
        D.load_triplets(path, split="chrono")
    with pytest.raises(ValueError, match="valid_fraction \\+ test_fraction < 1"):
        D.load_triplets(path, valid_fraction=0.5, test_fraction=0.5)


MOVIELENS = """1::10::5::978300760
1::20::3::978302109
1::30::4::978301968
1::40::4::978300275
1::50::5::978824291
2::10::4::978298413
2::30::2::978299026
2::60::5::978299000
2::60::5::978299999
"""


def test_movielens_threshold_and_temporal_split(tmp_path):
    path = write(tmp_path / "ml-toy" / "ratings.dat", MOVIELENS)
    data = D.load_movielens(path, threshold=4.0, valid_fraction=0.25, test_fraction=0.25)
    assert data.name == "ml-toy"
    assert data.user_ids.tolist() == [1, 2]
    assert data.item_ids.tolist() == [10, 30, 40, 50, 60]
    # user 1 positives by time: 40 (..275), 10 (..760), 30 (..968), 50 (..824291)
    assert dense(data.test) == [[0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    assert dense(data.valid) == [[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert dense(data.train) == [[1, 0, 1, 0, 0], [1, 0, 0, 0, 0]]
    stats = data.stats()
    assert (stats["below_min_rating"], stats["duplicates_removed"]) == (2, 1)


def test_movielens_random_split_is_seeded(tmp_path):
    path = write(tmp_path / "ml" / "ratings.dat", MOVIELENS)
    a = D.load_movielens(path, split="random", seed=1, valid_fraction=0.0, test_fraction=0.25)
    b = D.load_movielens(path, split="random", seed=1, valid_fraction=0.0, test_fraction=0.25)
    assert (a.test != b.test).nnz == 0 and a.test.nnz == 2


@pytest.mark.parametrize(
    "content, message",
    [
        ("1::10::5::978300760\n1::20::3\n", ":2: expected 4 fields like line 1, got '1::20::3'"),
        ("1::10::5\n", ":1: expected 'user::item::rating::timestamp', got '1::10::5'"),
        ("1::10::5::978300760\n2::1::x::978300760\n", ":2: bad rating 'x'"),
        ("1::10::5::97830076O\n", ":1: bad timestamp '97830076O'"),
    ],
)
def test_movielens_errors(tmp_path, content, message):
    path = write(tmp_path / "ml" / "ratings.dat", content)
    with pytest.raises(ValueError) as err:
        D.load_movielens(path)
    assert str(err.value) == f"{path}{message}"


# ---------------------------------------------------------------------------------------
# load_dataset


def test_load_dataset_dispatch(tmp_path, lightgcn_dir, monkeypatch):
    synthetic = D.load_dataset("synthetic", num_users=40, num_items=60, seed=2)
    assert (synthetic.num_users, synthetic.num_items, synthetic.name) == (40, 60, "synthetic")
    assert D.load_dataset(str(lightgcn_dir)).train.nnz == 5
    assert D.load_dataset(lightgcn_dir).train.nnz == 5
    ml = D.load_dataset(write(tmp_path / "ml" / "ratings.dat", MOVIELENS), valid_fraction=0, test_fraction=0)
    assert ml.train.nnz == 6
    triplets = D.load_dataset(write(tmp_path / "t.txt", "a x\nb y\n"), test_fraction=0, valid_fraction=0)
    assert triplets.user_ids.tolist() == ["a", "b"]
    monkeypatch.setenv("DSL_GOWALLA_DIR", str(lightgcn_dir))
    assert D.gowalla_dir() == lightgcn_dir
    assert D.load_dataset("gowalla").train.nnz == 5


def test_load_dataset_errors(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as err:
        D.load_dataset(missing)
    assert str(err.value) == (
        f"dataset {missing!r}: no such file or directory (expected 'synthetic', 'gowalla', "
        "a LightGCN-format directory, a MovieLens ratings.dat or a triplets file)"
    )
    monkeypatch.setenv("DSL_GOWALLA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="set DSL_GOWALLA_DIR"):
        D.load_dataset("gowalla")


def test_default_gowalla_dir(monkeypatch):
    monkeypatch.delenv("DSL_GOWALLA_DIR", raising=False)
    repo = Path(D.__file__).resolve().parents[1]
    assert D.gowalla_dir() == repo.parent / "shared" / "data" / "gowalla"


# ---------------------------------------------------------------------------------------
# InteractionData


@pytest.fixture
def small():
    train = csr([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    valid = csr([[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    test = csr([[0, 0, 0, 1], [1, 0, 0, 0], [1, 0, 0, 0]])
    return D.InteractionData(3, 4, train, valid, test, name="small")


def test_interaction_data_helpers(small):
    users, items = small.train_pairs()
    assert users.tolist() == [0, 0, 1] and items.tolist() == [0, 1, 2]
    assert users.dtype == np.int64 and items.dtype == np.int64
    assert small.item_popularity().tolist() == [1, 1, 1, 0]
    assert small.user_activity().tolist() == [2, 1, 0]
    merged = small.merged_train_valid()
    assert dense(merged.train) == [[1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    assert merged.valid.nnz == 0 and merged.valid.shape == (3, 4)
    assert merged.train.dtype == np.float32 and (merged.test != small.test).nnz == 0
    assert small.train.nnz == 3  # original untouched
    assert small.stats() == {
        "name": "small",
        "num_users": 3,
        "num_items": 4,
        "num_train": 3,
        "num_valid": 2,
        "num_test": 3,
        "train_density": 0.25,
        "users_without_train": 1,
        "valid_users": 2,
        "cold_valid_users": 0,
        "test_users": 2,
        "cold_test_users": 1,
        "cold_valid_items": 1,
        "cold_test_items": 1,
    }
    with pytest.raises(ValueError, match="split must be"):
        small.eval_users("train")


def test_interaction_data_validation(small):
    empty = sp.csr_matrix((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"train has shape \(3, 4\), expected \(3, 5\)"):
        D.InteractionData(3, 5, small.train, empty, empty)
    with pytest.raises(ValueError, match="dtype float64"):
        D.InteractionData(3, 4, small.train.astype(np.float64), empty, empty)
    with pytest.raises(ValueError, match="not binary"):
        D.InteractionData(3, 4, small.train * 2, empty, empty)
    with pytest.raises(TypeError, match="csr_matrix"):
        D.InteractionData(3, 4, small.train.tocoo(), empty, empty)
    with pytest.raises(ValueError, match="user_ids has 2 entries, expected 3"):
        D.InteractionData(3, 4, small.train, empty, empty, user_ids=np.array(["a", "b"]))


def test_as_dataset_covers_train_once_per_epoch():
    data = D.synthetic(num_users=60, num_items=100, seed=4)
    users, items = data.train_pairs()
    ds = data.as_dataset(batch_size=64, seed=7)
    assert int(ds.cardinality()) == -(-len(users) // 64)
    assert ds.element_spec["user_id"].dtype == tf.int64
    epochs = []
    for _ in range(2):
        batches = list(ds.as_numpy_iterator())
        assert all(len(b["user_id"]) == 64 for b in batches[:-1])
        got_u = np.concatenate([b["user_id"] for b in batches])
        got_i = np.concatenate([b["item_id"] for b in batches])
        assert sorted(zip(got_u.tolist(), got_i.tolist())) == list(zip(users.tolist(), items.tolist()))
        epochs.append(got_u)
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    again = np.concatenate([b["user_id"] for b in data.as_dataset(64, seed=7).as_numpy_iterator()])
    assert np.array_equal(again, epochs[0])  # same seed, same first epoch
    ordered = np.concatenate([b["user_id"] for b in data.as_dataset(64, shuffle=False).as_numpy_iterator()])
    assert np.array_equal(ordered, users)
    with pytest.raises(ValueError, match="batch_size"):
        data.as_dataset(0)


# ---------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_is_deterministic_and_fast():
    start = time.perf_counter()
    a = D.synthetic()
    elapsed = time.perf_counter() - start
    b = D.synthetic()
    c = D.synthetic(seed=1)
    assert elapsed < 2.0
    for split in ("train", "valid", "test"):
        assert (getattr(a, split) != getattr(b, split)).nnz == 0
    assert (a.train != c.train).nnz > 0
    stats = a.stats()
    assert (stats["num_users"], stats["num_items"]) == (2000, 3000)
    assert stats["users_without_train"] == 0 and stats["cold_test_users"] == 0
    total = np.diff((a.train + a.valid + a.test).indptr)
    assert total.min() >= 5 and 35 < total.mean() < 45
    assert 0.65 < a.train.nnz / total.sum() < 0.75
    assert abs(a.test.nnz / total.sum() - 0.2) < 0.01
    popularity = np.sort(a.item_popularity())[::-1]
    assert popularity[:300].sum() > 0.35 * popularity.sum()  # long tail: top 10% items >35%
    assert np.median(popularity) < 0.6 * popularity.mean()  # seen: 10 vs 18.8


def test_synthetic_argument_checks():
    with pytest.raises(ValueError, match="too small"):
        D.synthetic(num_users=10, num_items=12)
    with pytest.raises(ValueError, match="must be positive"):
        D.synthetic(dim=0)


@pytest.fixture(scope="module")
def synthetic_with_model():
    return D.synthetic(return_model=True)


def test_synthetic_oracle_beats_popularity(synthetic_with_model):
    data, model = synthetic_with_model
    popularity = data.item_popularity().astype(np.float32)
    pop = evaluate_full_ranking(lambda u: np.tile(popularity, (len(u), 1)), data.train, data.test)
    oracle = evaluate_full_ranking(model.logits, data.train, data.test)
    assert pop["num_users_evaluated"] == oracle["num_users_evaluated"] == 2000
    assert 0.1 < pop["recall@20"] < 0.25  # seen: 0.164
    assert oracle["recall@20"] >= 2.0 * pop["recall@20"]  # seen: 0.483
    assert oracle["ndcg@20"] >= 2.0 * pop["ndcg@20"]


def test_synthetic_item_knn_beats_popularity(synthetic_with_model):
    data, _ = synthetic_with_model
    train = data.train
    popularity = data.item_popularity().astype(np.float32)
    norms = np.sqrt(popularity) + 1e-9
    similarity = (train.T @ train).toarray() / norms[:, None] / norms[None, :]  # item cosine
    np.fill_diagonal(similarity, 0.0)
    knn = evaluate_full_ranking(lambda u: train[u] @ similarity, train, data.test)
    pop = evaluate_full_ranking(lambda u: np.tile(popularity, (len(u), 1)), train, data.test)
    assert knn["recall@20"] >= 1.3 * pop["recall@20"]  # seen: 0.259 vs 0.164
    assert knn["ndcg@20"] >= 1.3 * pop["ndcg@20"]


# ---------------------------------------------------------------------------------------
# Real data


@pytest.mark.slow
@pytest.mark.skipif(not D.gowalla_dir().is_dir(), reason="Gowalla data not available")
def test_gowalla_counts_and_load_time():
    start = time.perf_counter()
    data = D.load_dataset("gowalla")
    elapsed = time.perf_counter() - start
    print(f"Gowalla load: {elapsed:.2f}s")
    assert elapsed < 5.0
    assert (data.num_users, data.num_items) == (29858, 40981)
    assert (data.train.nnz, data.valid.nnz, data.test.nnz) == (719081, 91047, 217242)
    stats = data.stats()
    assert stats["duplicates_removed"] == 0 and stats["overlaps_removed"] == 0
    assert stats["users_without_train"] == 0 and stats["test_users"] == 29858
    assert data.merged_train_valid().train.nnz == 810128


def test_docstring_examples():
    import doctest

    result = doctest.testmod(D, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 10


# ---------------------------------------------------------------------------------------
# Issue 9 / 10: split directories of triplets, huge ids, unknown loader arguments


def test_split_dir_of_triplets_is_read_as_triplets(tmp_path):
    root = tmp_path / "trip"
    write(root / "train.txt", "0 5 1\n0 7 1\n3 5 1\n")
    write(root / "test.txt", "3 7 1\n")
    with pytest.warns(UserWarning, match=r"train\.txt.*'user item label' triplets.*format="):
        data = D.load_lightgcn_dir(root)
    # no fake interaction with item 1, raw ids kept: users 0, 3 -> 0, 1; items 5, 7 -> 0, 1
    assert (data.num_users, data.num_items) == (2, 2)
    assert data.user_ids.tolist() == [0, 3] and data.item_ids.tolist() == [5, 7]
    assert dense(data.train) == [[1, 1], [1, 0]] and dense(data.test) == [[0, 0], [0, 1]]
    # explicit formats: no warning; 'lightgcn' reads the old way (item 1 is an item)
    explicit = D.load_dataset(root, format="triplets")
    assert (explicit.train != data.train).nnz == 0
    as_lightgcn = D.load_dataset(root, format="lightgcn")
    assert as_lightgcn.num_items == 8 and as_lightgcn.train[0, 1] == 1


def test_split_dir_triplets_with_string_ids_and_errors(tmp_path):
    root = tmp_path / "s"
    write(root / "train.txt", "alice x\nbob y\nalice y\n")
    write(root / "valid.txt", "bob x\n")
    data = D.load_lightgcn_dir(root, format="triplets")
    assert data.user_ids.tolist() == ["alice", "bob"] and data.item_ids.tolist() == ["x", "y"]
    assert dense(data.train) == [[1, 1], [0, 1]] and dense(data.valid) == [[0, 0], [1, 0]]
    write(root / "test.txt", "bob x 1\nalice y 4\n")
    with pytest.raises(ValueError, match=r"test\.txt:1: expected 2 fields like line 1 of .*train\.txt"):
        D.load_lightgcn_dir(root, format="triplets")
    write(root / "train.txt", "alice x 1\nbob y 5\nalice y 1\n")
    write(root / "valid.txt", "bob x 1\n")
    with pytest.raises(ValueError, match=r"train\.txt:2: third column varies \(1 on line 1 of train\.txt, 5 here\)"):
        D.load_lightgcn_dir(root, format="triplets")
    with pytest.raises(ValueError, match=r"format must be 'auto', 'lightgcn' or 'triplets', got 'csv'"):
        D.load_lightgcn_dir(root, format="csv")


def test_huge_id_fails_before_allocating_naming_file_and_id(tmp_path):
    root = tmp_path / "huge"
    write(root / "train.txt", "0 1 2\n2000000000 3\n")
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        D.load_dataset(root, embedding_dim=64)
    message = str(err.value)
    assert message.startswith(f"{root / 'train.txt'}:2: user id 2000000000 implies a 2000000001 x 64 float32 table")
    assert "GB" in message and "available" in message
    assert time.perf_counter() - start < 5
    small = D.load_dataset(write(tmp_path / "ok" / "train.txt", "0 1\n1 0\n").parent, embedding_dim=64)
    assert small.num_users == 2


def test_unknown_dataset_argument_names_it_and_the_accepted_ones(tmp_path, lightgcn_dir):
    with pytest.raises(ValueError) as err:
        D.load_dataset("synthetic", bogus=1)
    assert str(err.value).startswith("unknown dataset argument 'bogus' for synthetic; accepted: ")
    assert "num_users" in str(err.value) and "return_model" not in str(err.value)
    with pytest.raises(ValueError, match=r"unknown dataset argument 'sep' for .*toy.*accepted: format"):
        D.load_dataset(lightgcn_dir, sep=",")


def test_stats_count_test_only_items(lightgcn_dir):
    stats = D.load_lightgcn_dir(lightgcn_dir).stats()
    # items 1, 2 are in test; item 2 is in train, item 1 is in train (user 0): none test-only
    assert stats["cold_test_items"] == 0 and stats["cold_valid_items"] == 0
    train = csr([[1, 0, 0]])
    test = csr([[0, 1, 1]])
    data = D.InteractionData(1, 3, train, sp.csr_matrix((1, 3), dtype=np.float32), test)
    assert data.stats()["cold_test_items"] == 2
