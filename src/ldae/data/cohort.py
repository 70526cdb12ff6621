"""Cohort CSV: schema, validation with clear errors, and subject-level splits.

Schema: ``subject, session, path, diagnosis, age`` are required; ``latent_path`` and ``split`` are
optional; any other column is kept. ``session`` is months since baseline (int); ``ses-M06``, ``M06`` and
``6`` all read as 6. Relative paths resolve against the CSV's folder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ldae.errors import CohortError
from ldae.io import write_csv

REQUIRED_COLUMNS = ("subject", "session", "path", "diagnosis", "age")
OPTIONAL_PATH_COLUMNS = ("latent_path",)
DEFAULT_LABELS = ("CN", "MCI", "AD")
SPLITS = ("train", "val", "test")
AGE_RANGE = (0, 130)  # years; outside it an age is a unit or data-entry error (months, days, -5, 700)
_SESSION_RE = re.compile(r"^(?:ses-)?M?(\d+)$", re.IGNORECASE)


def parse_session(value: object) -> int:
    """Months since baseline from ``ses-M06`` / ``M06`` / ``6`` / ``6.0``; ValueError otherwise."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    match = _SESSION_RE.match(str(value).strip())
    if not match:
        raise ValueError(value)
    return int(match.group(1))


def _row(i: int) -> str:
    """CSV line number of data row ``i`` (header is line 1)."""
    return f"row {i + 2}"


def read_cohort(
    csv: str | Path,
    labels: Sequence[str] = DEFAULT_LABELS,
    check_files: bool = True,
    required: Sequence[str] = REQUIRED_COLUMNS,
) -> pd.DataFrame:
    """Read and validate a cohort CSV; return it with absolute paths and int sessions.

    Raises CohortError naming the file, row and column for: unreadable/empty CSV, missing columns,
    empty cells, bad or negative session, non-numeric, non-finite or implausible age (outside 0-130 years), unknown diagnosis, duplicate
    (subject, session), missing files, and invalid ``split`` values or subject leakage across splits.
    """
    csv = Path(csv)
    if not csv.is_file():
        raise CohortError(f"{csv}: cohort CSV not found")
    try:
        df = pd.read_csv(csv, dtype={"subject": str})
    except pd.errors.EmptyDataError:
        raise CohortError(f"{csv}: the CSV is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CohortError(f"{csv}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CohortError(f"{csv}: missing required column(s): {', '.join(missing)}")
    if len(df) == 0:
        raise CohortError(f"{csv}: the CSV has a header but no rows")

    for col in required:
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            i = int(np.flatnonzero(empty.to_numpy())[0])
            raise CohortError(f"{csv}: {_row(i)}: column '{col}' is empty")

    df["subject"] = df["subject"].astype(str).str.strip()
    sessions = []
    for i, value in enumerate(df["session"]):
        try:
            sessions.append(parse_session(value))
        except ValueError:
            raise CohortError(
                f"{csv}: {_row(i)}: column 'session' has '{value}' (expected months, e.g. 6 or ses-M06)"
            ) from None
    negative = [i for i, m in enumerate(sessions) if m < 0]
    if negative:
        i = negative[0]
        raise CohortError(f"{csv}: {_row(i)}: column 'session' has '{df['session'].iloc[i]}' (months since "
                          "baseline cannot be negative)")
    df["session"] = np.asarray(sessions, dtype=np.int64)

    age = pd.to_numeric(df["age"], errors="coerce")
    bad = age.isna() | ~np.isfinite(age.to_numpy(dtype=float, na_value=np.nan))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise CohortError(f"{csv}: {_row(i)}: column 'age' has non-numeric value '{df['age'].iloc[i]}'")
    implausible = (age < AGE_RANGE[0]) | (age > AGE_RANGE[1])
    if implausible.any():
        i = int(np.flatnonzero(implausible.to_numpy())[0])
        raise CohortError(f"{csv}: {_row(i)}: column 'age' has {df['age'].iloc[i]} (expected years, "
                          f"{AGE_RANGE[0]}-{AGE_RANGE[1]})")
    df["age"] = age.astype(float)

    df["diagnosis"] = df["diagnosis"].astype(str).str.strip()
    unknown = ~df["diagnosis"].isin(list(labels))
    if unknown.any():
        i = int(np.flatnonzero(unknown.to_numpy())[0])
        raise CohortError(
            f"{csv}: {_row(i)}: column 'diagnosis' has unknown value '{df['diagnosis'].iloc[i]}' "
            f"(allowed: {', '.join(labels)})"
        )

    dup = df.duplicated(["subject", "session"], keep="first")
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise CohortError(
            f"{csv}: {_row(i)}: duplicate (subject, session) = ({df['subject'].iloc[i]}, "
            f"{df['session'].iloc[i]})"
        )

    base = csv.resolve().parent
    for col in ("path", *OPTIONAL_PATH_COLUMNS):
        if col not in df.columns:
            continue
        resolved = []
        for i, value in enumerate(df[col]):
            if pd.isna(value) or str(value).strip() == "":
                resolved.append(None if col != "path" else "")
                continue
            p = Path(str(value).strip()).expanduser()
            p = p if p.is_absolute() else base / p
            if check_files and not p.is_file():
                raise CohortError(f"{csv}: {_row(i)}: column '{col}': file not found: {p}")
            resolved.append(str(p))
        df[col] = resolved

    if "split" in df.columns:
        validate_split(df, source=str(csv))
    return df.reset_index(drop=True)


def validate_split(df: pd.DataFrame, source: str = "cohort") -> None:
    """Check ``split`` values and that no subject appears in two splits."""
    values = df["split"].astype(str).str.strip()
    bad = ~values.isin(SPLITS)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise CohortError(
            f"{source}: {_row(i)}: column 'split' has '{df['split'].iloc[i]}' (allowed: {', '.join(SPLITS)})"
        )
    per_subject = values.groupby(df["subject"]).nunique()
    leaked = per_subject[per_subject > 1]
    if len(leaked):
        raise CohortError(
            f"{source}: subject '{leaked.index[0]}' appears in more than one split (subject leakage)"
        )
    df["split"] = values


def assign_splits(
    df: pd.DataFrame,
    test_fraction: float = 0.1,
    val_fraction: float = 0.01,
    seed: int = 0,
    stratify: str | None = "diagnosis",
) -> pd.DataFrame:
    """Return a copy with a subject-level ``split`` column (train/val/test).

    ``test_fraction`` of subjects go to test; ``val_fraction`` of the remaining (train) subjects go to
    validation, at least one when there are ≥3 subjects. Stratified on each subject's baseline
    ``stratify`` value so that small cohorts keep every diagnosis in test. Seeded and deterministic.
    """
    if not 0 <= test_fraction < 1 or not 0 <= val_fraction < 1:
        raise CohortError("split fractions must lie in [0, 1)")
    rng = np.random.default_rng(seed)
    first = df.sort_values(["subject", "session"]).groupby("subject", sort=True).first()
    groups = first[stratify] if stratify and stratify in first.columns else pd.Series("all", first.index)
    n_subjects = len(first)
    strata = sorted(groups.groupby(groups).groups.items(), key=lambda kv: str(kv[0]))
    # total test count from the whole cohort, shared across strata by largest remainder
    n_test_total = int(round(test_fraction * n_subjects))
    quotas = np.array([test_fraction * len(members) for _, members in strata])
    n_test = np.floor(quotas).astype(int)
    for k in np.argsort(-(quotas - n_test), kind="stable")[: max(0, n_test_total - int(n_test.sum()))]:
        n_test[k] += 1
    subjects_test: list[str] = []
    for (_, members), k in zip(strata, n_test):
        members = np.array(sorted(members))
        rng.shuffle(members)
        subjects_test += list(members[:k])
    remaining = np.array(sorted(set(first.index) - set(subjects_test)))
    rng.shuffle(remaining)
    n_val = int(round(val_fraction * len(remaining)))
    if val_fraction > 0 and n_val == 0 and n_subjects >= 3:
        n_val = 1
    subjects_val = list(remaining[:n_val])
    out = df.copy()
    split = np.full(len(out), "train", dtype=object)
    split[out["subject"].isin(subjects_test).to_numpy()] = "test"
    split[out["subject"].isin(subjects_val).to_numpy()] = "val"
    out["split"] = split
    validate_split(out)
    return out


def ensure_split(df: pd.DataFrame, seed: int = 0, **kwargs: float) -> pd.DataFrame:
    """Keep an existing (validated) ``split`` column, or assign one with :func:`assign_splits`."""
    if "split" in df.columns:
        validate_split(df)
        return df
    return assign_splits(df, seed=seed, **kwargs)


def write_cohort(df: pd.DataFrame, path: str | Path) -> Path:
    """Atomically write a cohort CSV, storing paths relative to its folder when they lie beneath it."""
    path = Path(path)
    out = df.copy()
    base = path.resolve().parent
    for col in ("path", *OPTIONAL_PATH_COLUMNS):
        if col in out.columns:
            out[col] = [_relative_to(p, base) for p in out[col]]
    return write_csv(path, out)


def default_split_path(csv: str | Path) -> Path:
    """Where ``ldae check --write-split`` writes by default: ``COHORT.split.csv`` beside ``COHORT.csv``."""
    csv = Path(csv)
    return csv.with_name(f"{csv.stem}.split{csv.suffix or '.csv'}")


def write_split_copy(source: str | Path, split: Sequence[str], out: str | Path) -> Path:
    """Write ``source`` (a cohort CSV) to ``out`` with a ``split`` column appended, every other cell
    copied as the exact text it had (``000``, ``NA``, ``null``, ``ses-M06`` and relative paths unchanged;
    a UTF-8 BOM and CRLF line ends kept). ``split[i]`` belongs to the i-th non-blank data row, the order in
    which :func:`read_cohort` returns rows. Never overwrites ``source`` (CohortError); written atomically.
    """
    import csv as csvlib
    import io

    from ldae.io import atomic_path

    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise CohortError(f"{out}: --write-split never rewrites the cohort CSV in place; choose another file")
    if out.is_dir():
        raise CohortError(f"{out}: is a folder; --write-split needs a CSV file name")
    raw = source.read_bytes()
    bom = raw.startswith(b"\xef\xbb\xbf")
    text = raw.decode("utf-8-sig")
    first_end = text.find("\n")
    newline = "\r\n" if first_end > 0 and text[first_end - 1] == "\r" else "\n"
    rows = list(csvlib.reader(io.StringIO(text, newline="")))
    header, data = rows[0], rows[1:]
    if "split" in [c.strip() for c in header]:
        raise CohortError(f"{source}: already has a 'split' column; nothing to write")
    nonblank = [i for i, r in enumerate(data) if r]  # pandas skips only empty lines
    if len(nonblank) != len(split):
        raise CohortError(f"{source}: {len(nonblank)} data rows but {len(split)} split values")
    values = dict(zip(nonblank, split))
    with atomic_path(out) as tmp:
        with tmp.open("w", encoding="utf-8-sig" if bom else "utf-8", newline="") as fh:
            writer = csvlib.writer(fh, lineterminator=newline)
            writer.writerow([*header, "split"])
            for i, r in enumerate(data):
                writer.writerow([*r, values[i]] if i in values else r)
    return out


def _relative_to(value: object, base: Path) -> object:
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value) == "":
        return value
    p = Path(str(value))
    try:
        return str(p.resolve().relative_to(base))
    except ValueError:
        return str(p)


def summarize(df: pd.DataFrame) -> dict:
    """Counts a user wants before training: subjects, sessions, diagnoses, ages, split sizes."""
    baseline = df.sort_values("session").groupby("subject").first()
    summary: dict = {
        "subjects": int(df["subject"].nunique()),
        "scans": len(df),
        "sessions_per_subject": {
            "min": int(df.groupby("subject").size().min()),
            "max": int(df.groupby("subject").size().max()),
            "mean": float(df.groupby("subject").size().mean()),
        },
        "session_months": sorted(int(s) for s in df["session"].unique()),
        "diagnosis_scans": {k: int(v) for k, v in df["diagnosis"].value_counts().sort_index().items()},
        "diagnosis_subjects_baseline": {
            k: int(v) for k, v in baseline["diagnosis"].value_counts().sort_index().items()
        },
        "age": {
            "min": float(df["age"].min()),
            "max": float(df["age"].max()),
            "mean": float(df["age"].mean()),
            "std": float(df["age"].std(ddof=0)),
        },
    }
    if "split" in df.columns:
        summary["split_subjects"] = {
            s: int(df.loc[df["split"] == s, "subject"].nunique()) for s in SPLITS
        }
        summary["split_scans"] = {s: int((df["split"] == s).sum()) for s in SPLITS}
    return summary
