from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ldae.data.cohort import (
    assign_splits,
    ensure_split,
    parse_session,
    read_cohort,
    summarize,
    validate_split,
    write_cohort,
)
from ldae.errors import CohortError


def _csv(tmp_path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    df = pd.DataFrame(rows, columns=columns)
    path = tmp_path / "cohort.csv"
    df.to_csv(path, index=False)
    return path


def _touch(tmp_path: Path, name: str) -> str:
    p = tmp_path / name
    p.write_bytes(b"x")
    return name


def _rows(tmp_path: Path, n: int = 3) -> list[dict]:
    return [
        {"subject": f"s{i}", "session": "ses-M00", "path": _touch(tmp_path, f"s{i}.nii.gz"),
         "diagnosis": ("CN", "MCI", "AD")[i % 3], "age": 70 + i}
        for i in range(n)
    ]


@pytest.mark.parametrize("value,expected", [("ses-M06", 6), ("M12", 12), ("24", 24), (36, 36), (6.0, 6),
                                            ("ses-m48", 48)])
def test_parse_session(value, expected):
    assert parse_session(value) == expected


@pytest.mark.parametrize("value", ["baseline", "ses-X06", "6.5", ""])
def test_parse_session_rejects(value):
    with pytest.raises(ValueError):
        parse_session(value)


def test_read_cohort_resolves_paths_and_types(tmp_path: Path):
    rows = _rows(tmp_path)
    rows[0]["extra"] = "kept"
    csv = _csv(tmp_path, rows)
    df = read_cohort(csv)
    assert list(df["session"]) == [0, 0, 0]
    assert df["age"].dtype == float
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in df["path"])
    assert "extra" in df.columns


def test_missing_column_named(tmp_path: Path):
    rows = _rows(tmp_path)
    csv = _csv(tmp_path, [{k: v for k, v in r.items() if k != "age"} for r in rows])
    with pytest.raises(CohortError, match=r"missing required column\(s\): age"):
        read_cohort(csv)


def test_empty_csv_and_header_only(tmp_path: Path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(CohortError, match="empty"):
        read_cohort(empty)
    header = tmp_path / "header.csv"
    header.write_text("subject,session,path,diagnosis,age\n")
    with pytest.raises(CohortError, match="no rows"):
        read_cohort(header)


@pytest.mark.parametrize(
    "column,value,message",
    [
        ("age", "old", r"row 3: column 'age' has non-numeric value 'old'"),
        ("diagnosis", "FTD", r"row 3: column 'diagnosis' has unknown value 'FTD'"),
        ("session", "baseline", r"row 3: column 'session' has 'baseline'"),
        ("path", "missing.nii.gz", r"row 3: column 'path': file not found: .*missing.nii.gz"),
    ],
)
def test_bad_values_name_row_and_column(tmp_path: Path, column, value, message):
    rows = _rows(tmp_path)
    rows[1][column] = value
    with pytest.raises(CohortError, match=message):
        read_cohort(_csv(tmp_path, rows))


def test_duplicate_subject_session(tmp_path: Path):
    rows = _rows(tmp_path)
    rows[2]["subject"] = "s0"
    rows[2]["session"] = "M00"
    with pytest.raises(CohortError, match=r"row 4: duplicate \(subject, session\) = \(s0, 0\)"):
        read_cohort(_csv(tmp_path, rows))


def test_custom_labels(tmp_path: Path):
    rows = _rows(tmp_path)
    rows[0]["diagnosis"] = "FTD"
    df = read_cohort(_csv(tmp_path, rows), labels=("CN", "MCI", "AD", "FTD"))
    assert df["diagnosis"].iloc[0] == "FTD"


def _big_cohort(n_subjects: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        dx = rng.choice(["CN", "MCI", "AD"], p=[0.4, 0.35, 0.25])
        for months in range(0, 12 * int(rng.integers(1, 4)), 12):
            rows.append({"subject": f"sub-{s:04d}", "session": months, "path": "", "diagnosis": dx,
                         "age": 70.0})
    return pd.DataFrame(rows)


def test_assign_splits_no_leakage_fractions_and_seed():
    df = _big_cohort()
    a = assign_splits(df, test_fraction=0.1, val_fraction=0.05, seed=3)
    b = assign_splits(df, test_fraction=0.1, val_fraction=0.05, seed=3)
    c = assign_splits(df, test_fraction=0.1, val_fraction=0.05, seed=4)
    assert (a["split"] == b["split"]).all()
    assert not (a["split"] == c["split"]).all()
    per_subject = a.groupby("subject")["split"].nunique()
    assert (per_subject == 1).all()
    subjects = a.groupby("subject")["split"].first().value_counts()
    assert subjects["test"] == 20  # 10% of 200 subjects
    assert subjects["val"] == 9  # round(5% of 180)
    # stratified: every diagnosis is represented in test
    test_dx = set(a.loc[a["split"] == "test", "diagnosis"])
    assert test_dx == {"CN", "MCI", "AD"}


def test_small_cohort_gets_a_val_subject():
    df = _big_cohort(n_subjects=5)
    out = assign_splits(df, test_fraction=0.2, val_fraction=0.01, seed=0)
    counts = out.groupby("subject")["split"].first().value_counts()
    assert counts["test"] == 1 and counts["val"] == 1 and counts["train"] == 3


def test_validate_split_detects_leakage_and_bad_values():
    df = pd.DataFrame({"subject": ["a", "a", "b"], "split": ["train", "test", "train"]})
    with pytest.raises(CohortError, match="subject 'a' appears in more than one split"):
        validate_split(df)
    df = pd.DataFrame({"subject": ["a", "b"], "split": ["train", "holdout"]})
    with pytest.raises(CohortError, match="row 3: column 'split' has 'holdout'"):
        validate_split(df)


def test_ensure_split_keeps_existing():
    df = _big_cohort(20)
    first = assign_splits(df, seed=1)
    kept = ensure_split(first, seed=99)
    assert (kept["split"] == first["split"]).all()


def test_write_cohort_roundtrip_relative_paths(tmp_path: Path):
    rows = _rows(tmp_path)
    csv = _csv(tmp_path, rows)
    df = assign_splits(read_cohort(csv), test_fraction=0.34, seed=0)
    out = write_cohort(df, tmp_path / "copy.csv")
    raw = pd.read_csv(out)
    assert not any(Path(p).is_absolute() for p in raw["path"])
    again = read_cohort(out)
    assert list(again["path"]) == list(df["path"])
    assert list(again["split"]) == list(df["split"])
    s = summarize(again)
    assert s["subjects"] == 3 and s["diagnosis_scans"] == {"AD": 1, "CN": 1, "MCI": 1}
    assert sum(s["split_subjects"].values()) == 3
