"""Given splits (``--data TRAIN --test TEST``): reading, the rules for odd input, evaluation, tenants."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedrec.client.vault import load_tenant, tenant_paths
from fedrec.shared_model.baselines import EASE, Popularity
from fedrec.shared_model.data import UserSplit, concat_splits
from fedrec.shared_model.evaluate import evaluate
from fedrec.simulations.data.dataset import PreparedData, prepare_given_split
from fedrec.simulations.data.prepare import PrepareConfig, prepare_federation
from fedrec.simulations.data.sources import detect_columns, load, load_given_split
from fedrec.simulations.errors import DataError

# Users 0..3, items 10..15. User 2's test holds 99 (not in TRAIN: unrankable) and 12 (in its TRAIN).
TRAIN = "0 10 11 12\n\n1 11 12 13 11\n2 12 14\n3 10 13 14 15\n"  # a blank line; user 1 repeats 11
TEST = "0 13 14 14\n2 99 12 15\n3 11\n"  # user 0 repeats 14; user 1 has no test line


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def given(tmp_path: Path, train: str = TRAIN, test: str = TEST, seed: int = 0) -> PreparedData:
    tr, te = load_given_split(write(tmp_path, "train.txt", train), write(tmp_path, "test.txt", test))
    return prepare_given_split(tr, te, seed=seed)


def items_of(data: PreparedData, idx: np.ndarray) -> list[str]:
    return [data.catalog.item_ids[int(i)] for i in idx]


def test_lines_are_read_as_given_with_validation_from_train(tmp_path: Path) -> None:
    data = given(tmp_path)
    split = data.split
    assert data.catalog.item_ids == ("10", "11", "12", "13", "14", "15")  # TRAIN's items only
    assert split.n_users == 4 and split.has_test_sets
    # Test sets: duplicates collapse, file order kept, 99 is unrankable but counted.
    assert [items_of(data, split.test_set(u)) for u in range(4)] == [["13", "14"], [], ["12", "15"], ["11"]]
    assert split.test_sizes is not None
    assert split.test_sizes.tolist() == [2, 0, 3, 1]
    assert items_of(data, split.test_item[[0, 2, 3]]) == ["13", "12", "11"]
    assert split.test_item[1] == -1
    # Validation: one TRAIN item per user with ≥ 2 (all four here), never a TEST item.
    train_sets = [{"10", "11", "12"}, {"11", "12", "13"}, {"12", "14"}, {"10", "13", "14", "15"}]
    for u in range(4):
        val = data.catalog.item_ids[int(split.val_item[u])]
        rest = set(items_of(data, split.history(u)))
        assert val in train_sets[u] and val not in rest
        assert rest | {val} == train_sets[u]  # TRAIN = training rows + the validation item, nothing lost
    assert data.given is not None
    assert data.given["test_only_items"] == 1 and data.given["test_only_interactions"] == 1
    assert data.given["test_in_train"] == 1  # user 2's item 12
    assert "never" in data.given["validation"]


def test_validation_draw_is_seeded(tmp_path: Path) -> None:
    a, b = given(tmp_path, seed=3).split.val_item, given(tmp_path, seed=3).split.val_item
    np.testing.assert_array_equal(a, b)
    draws = {tuple(given(tmp_path, seed=s).split.val_item.tolist()) for s in range(8)}
    assert len(draws) > 1


class Oracle:
    """Scores each user's TEST items (as read from the split) highest: the best any model can do."""

    def score(
        self, split: UserSplit, users: np.ndarray, histories: list[np.ndarray], which: str
    ) -> np.ndarray:
        out = np.zeros((len(users), split.n_items), dtype=np.float32)
        for b, u in enumerate(users):
            out[b, split.test_set(int(u))] = 1.0
        return out


def test_unrankable_and_seen_test_items_are_misses_in_the_denominator(tmp_path: Path) -> None:
    data = given(tmp_path)
    full = evaluate(Oracle(), data.split, data.catalog).to_metrics()["full"]
    # Users with a test set: 0 (2 of 2 rankable), 2 (only 15 reachable of 3: 99 unknown, 12 seen), 3 (1 of 1).
    assert full["users"] == 3
    assert full["recall@20"] == pytest.approx((1.0 + 1 / 3 + 1.0) / 3)
    assert full["hit@20"] == pytest.approx(1.0)
    l2, l3, l4 = 1.0, 1 / math.log2(3), 1 / math.log2(4)
    ndcg2 = l2 / (l2 + l3 + l4)  # 15 at rank 0; ideal over min(3, 20) = 3 positions
    assert full["ndcg@20"] == pytest.approx((1.0 + ndcg2 + 1.0) / 3)
    assert full["hr@10"] == pytest.approx(1.0) and full["mrr"] == pytest.approx(1.0)


def test_popularity_on_a_given_split_by_hand(tmp_path: Path) -> None:
    data = given(tmp_path, seed=0)
    split = data.split
    counts = np.bincount(split.train_items, minlength=split.n_items)
    res = evaluate(Popularity().fit(split), split, data.catalog, set_k=2).to_metrics()["full"]
    # Reference: rank the unseen items by count (ties: lower index first, test items after non-test).
    recall, users = 0.0, 0
    for u in range(split.n_users):
        size = int(split.test_sizes[u]) if split.test_sizes is not None else 0
        if size == 0:
            continue
        users += 1
        seen = set(split.eval_history(u, "test").tolist())
        test = set(split.test_set(u).tolist())
        cand = [i for i in range(split.n_items) if i not in seen]
        cand.sort(key=lambda i: (-counts[i], i in test, i))
        recall += sum(1 for i in cand[:2] if i in test) / size
    assert res["recall@2"] == pytest.approx(recall / users)


def test_bytes_subset_and_concat_keep_test_sets(tmp_path: Path) -> None:
    split = given(tmp_path).split
    back = UserSplit.from_bytes(split.to_bytes())
    assert back.test_sizes is not None and split.test_sizes is not None
    np.testing.assert_array_equal(back.test_sizes, split.test_sizes)
    parts = [split.subset([3, 0]), split.subset([2, 1])]
    joined = concat_splits(parts)
    assert [joined.test_set(u).tolist() for u in range(4)] == [
        split.test_set(u).tolist() for u in (3, 0, 2, 1)
    ]
    loo = replace(split, test_indptr=None, test_items=None, test_sizes=None)
    with pytest.raises(ValueError, match="given split with a leave-one-out"):
        concat_splits([split, loo])


def synthetic_given(n_users: int = 300, n_items: int = 80, seed: int = 0) -> tuple[str, str]:
    """Lines of a random given split with taste structure (two item blocks)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for u in range(n_users):
        block = np.arange(n_items // 2) + (n_items // 2) * (u % 2)
        items = rng.choice(block, size=rng.integers(6, 14), replace=False)
        cut = max(1, len(items) // 5)
        train.append(" ".join(map(str, [u, *items[cut:]])))
        test.append(" ".join(map(str, [u, *items[:cut]])))
    return "\n".join(train) + "\n", "\n".join(test) + "\n"


def test_federated_sums_equal_the_centralized_evaluation(tmp_path: Path) -> None:
    train, test = synthetic_given()
    data = given(tmp_path, train, test)
    model = EASE(lam=5.0).fit(data.split)
    whole = evaluate(model, data.split, data.catalog).to_metrics()["full"]
    halves = [data.split.subset(np.arange(0, 150)), data.split.subset(np.arange(150, 300))]
    merged = sum(evaluate(model, h, data.catalog, batch_size=7) for h in halves)
    got = merged.to_metrics()["full"]  # type: ignore[union-attr]
    for key in ("recall@20", "ndcg@20", "hit@20", "hr@10", "ndcg@10", "mrr"):
        assert got[key] == pytest.approx(whole[key]), key
    assert whole["recall@20"] > 0.3  # the block structure is learnable


def test_test_sets_travel_with_their_users_into_tenants(tmp_path: Path) -> None:
    train, test = synthetic_given()
    data = given(tmp_path, train, test)
    result = prepare_federation(data, tmp_path / "fed", PrepareConfig(tenants=3, k_anonymity=1, seed=1))
    parts = [load_tenant(*tenant_paths(result.fed_dir, i)).split for i in range(3)]
    assert sum(p.n_users for p in parts) == data.split.n_users
    for plan, part in zip(result.plan.tenants, parts, strict=True):
        assert part.has_test_sets
        for row, u in enumerate(plan.users):
            assert part.test_set(row).tolist() == data.split.test_set(int(u)).tolist()
    tenant_eval = sum(evaluate(Popularity().fit(data.split), p, data.catalog) for p in parts)
    central = evaluate(Popularity().fit(data.split), data.split, data.catalog)
    assert tenant_eval.to_metrics()["full"]["recall@20"] == pytest.approx(  # type: ignore[union-attr]
        central.to_metrics()["full"]["recall@20"]
    )


def test_csv_given_split_with_standard_columns(tmp_path: Path) -> None:
    tr = write(tmp_path, "train.csv", "user_id,item_id,timestamp\nu1,a,1\nu1,b,2\nu2,b,1\nu2,c,5\nu2,a,6\n")
    te = write(tmp_path, "test.csv", "user_id,item_id,timestamp\nu1,c,9\nu2,d,9\n")
    data = prepare_given_split(*load_given_split(tr, te))
    assert data.catalog.item_ids == ("a", "b", "c")
    assert data.split.test_sizes is not None and data.split.test_sizes.tolist() == [1, 1]
    assert data.given is not None and data.given["test_only_items"] == 1  # d


@pytest.mark.parametrize(
    ("header", "spec"),
    [
        ("user,item,timestamp", "user=user,item=item,timestamp=timestamp"),
        ("userId,movieId,timestamp", "user=userId,item=movieId,timestamp=timestamp"),
        ("UserID,ItemID,Rating", "user=UserID,item=ItemID,rating=Rating"),
        ("user_id,product_id,score,ts", "user=user_id,item=product_id,rating=score,timestamp=ts"),
    ],
)
def test_standard_csv_columns_need_no_columns_flag(tmp_path: Path, header: str, spec: str) -> None:
    assert detect_columns(header.split(",")) == spec
    rows = [[1, 5, 3, 10], [1, 6, 4, 11], [2, 5, 2, 12]]
    width = len(header.split(","))
    body = "".join(",".join(str(v) for v in r[:width]) + "\n" for r in rows)
    path = write(tmp_path, "log.csv", header + "\n" + body)
    ds = load(path)
    assert ds.interactions["user"].tolist() == ["1", "1", "2"]
    assert ds.interactions["item"].tolist() == ["5", "6", "5"]


def test_ambiguous_or_unknown_columns_still_ask_for_columns(tmp_path: Path) -> None:
    assert detect_columns(["user", "user_id", "item"]) is None
    path = write(tmp_path, "log.csv", "customer,sku\n1,2\n")
    with pytest.raises(DataError, match="--columns"):
        load(path)


# ------------------------------------------------------------------ bad input: one clear line each

BAD = {
    "non-integer id": ("0 10 x1\n", "0 10\n", "line 1: 'x1' is not an integer id"),
    "negative id": ("0 10 11\n", "0 -4\n", "line 1: '-4' is a negative id"),
    "user only in test": ("0 10 11\n1 11 12\n", "0 12\n7 10\n", "1 of its 2 user(s) that are not in TRAIN"),
    "another train file": ("0 10 11\n1 11 12\n", "5 10\n6 11\n", "shares no user with TRAIN"),
    "no shared item": ("0 10 11\n1 11 12\n", "0 50\n1 51\n", "shares no item with TRAIN"),
    "empty test": ("0 10 11\n", "\n\n3\n", "holds no interactions"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_given_split_is_one_clear_error(tmp_path: Path, case: str) -> None:
    train, test, needle = BAD[case]
    with pytest.raises(DataError) as err:
        given(tmp_path, train, test)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_columns_flag_on_a_lines_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'user item item …' format"):
        load_given_split(
            write(tmp_path, "a.txt", "0 1\n"), write(tmp_path, "b.txt", "0 2\n"), columns="user=a,item=b"
        )


FEDREC = [sys.executable, "-m", "fedrec.simulations.cli.main"]


@pytest.mark.parametrize("case", ["user only in test", "another train file", "negative id"])
def test_cli_bad_given_split_exits_2_without_run_dir(tmp_path: Path, case: str) -> None:
    train, test, needle = BAD[case]
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            *FEDREC,
            "centralized",
            "--data",
            write(tmp_path, "tr.txt", train),
            "--test",
            write(tmp_path, "te.txt", test),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and needle in lines[-1]
    assert not out.exists() and not any(p.name.startswith(".run") for p in tmp_path.iterdir())


COMMANDS = {
    "prepare": ["prepare", "--tenants", "2"],
    "simulate": ["simulate", "--tenants", "2", "--rounds", "1"],
    "frontier": ["frontier", "--users", "", "--epsilons", "8", "--seeds", "1"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_test_file_for_another_train_file(tmp_path: Path, command: str) -> None:
    train, test, needle = BAD["another train file"]
    out = tmp_path / "out"
    args = ["--data", write(tmp_path, "tr.txt", train), "--test", write(tmp_path, "te.txt", test)]
    proc = subprocess.run(
        [*FEDREC, *COMMANDS[command], *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and needle in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["te.txt", "tr.txt"]  # nothing written


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["centralized", "--test", "TEST"], "needs --data TRAIN (a file)"),
        (["simulate", "--test", "TEST"], "--test TEST goes with --data TRAIN"),
        (["frontier", "--users", "", "--test", "TEST"], "--data TRAIN --test TEST (both files)"),
    ],
)
def test_test_without_a_train_file_is_refused(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "out"
    args = [write(tmp_path, "te.txt", "0 1\n") if a == "TEST" else a for a in args]
    proc = subprocess.run(
        [*FEDREC, *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and needle in lines[-1]
    assert not out.exists()


@pytest.mark.slow
def test_cli_centralized_on_a_given_split_reports_recall_for_model_and_baselines(tmp_path: Path) -> None:
    train, test = synthetic_given(400, 60)
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            *FEDREC,
            "centralized",
            "--data",
            write(tmp_path, "train.txt", train),
            "--test",
            write(tmp_path, "test.txt", test),
            "--epochs",
            "3",
            "--patience",
            "3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "300"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for block in (metrics, metrics["baselines"]["popularity"], metrics["baselines"]["ease"]):
        for key in ("recall@20", "ndcg@20", "hit@20", "hr@10"):
            assert 0.0 <= block["full"][key] <= 1.0
    assert (
        metrics["baselines"]["ease"]["full"]["recall@20"]
        > metrics["baselines"]["popularity"]["full"]["recall@20"]
    )
    assert metrics["dataset"]["split"]["kind"] == "given"
    assert metrics["baselines"]["ease"]["support"] == {"items": 60, "catalogue": 60, "rest": "none"}
    config = json.loads((out / "config.json").read_text())
    assert config["test"].endswith("test.txt")
    assert len(json.loads((out / "model.json").read_text())["catalog"]["item_ids"]) == 60  # TRAIN's items
