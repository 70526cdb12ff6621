"""Inputs of ``ldae preprocess``: files, folders and BIDS roots (``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``)
-> scans with their subject/session labels, the output path of each, and the cohort CSV rows built from
``participants.tsv`` / ``sub-*_sessions.tsv`` (:func:`cohort_rows`)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldae.errors import CohortError
from ldae.io import is_nifti_name, nifti_stem, write_csv

_BIDS_SUB = re.compile(r"^sub-([A-Za-z0-9]+)$")
_BIDS_NAME = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?_")


@dataclass(frozen=True)
class ScanInput:
    """One raw scan, with its BIDS subject/session labels (without prefix) and BIDS root when known."""

    path: Path
    subject: str | None = None
    session: str | None = None
    bids_root: Path | None = None

    @property
    def stem(self) -> str:
        return nifti_stem(self.path)


def describe_input(path: str | Path) -> ScanInput:
    """Subject/session labels from a BIDS file name (``sub-01_ses-M06_T1w.nii.gz``), and the BIDS root
    (the folder above ``sub-*``) when the file sits in a BIDS tree."""
    path = Path(path).resolve()
    match = _BIDS_NAME.match(path.name)
    if not match:
        return ScanInput(path)
    root = None
    for parent in path.parents:
        if _BIDS_SUB.match(parent.name):
            root = parent.parent
            break
    return ScanInput(path, match.group("sub"), match.group("ses"), root)


def _is_nifti_file(path: Path) -> bool:
    return path.is_file() and is_nifti_name(path)


def discover_inputs(paths: Iterable[str | Path]) -> list[ScanInput]:
    """Scans named by ``paths``: NIfTI files as given; a folder is searched as a BIDS root
    (``sub-*/ses-*/anat/*_T1w.nii[.gz]`` and ``sub-*/anat/*_T1w.nii[.gz]``), else for NIfTI files
    directly inside it. Sorted, duplicates removed; CohortError for a missing path or an empty folder."""
    found: dict[Path, ScanInput] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            hits = sorted(
                p for pattern in ("sub-*/ses-*/anat/*_T1w.nii*", "sub-*/anat/*_T1w.nii*")
                for p in path.glob(pattern) if _is_nifti_file(p)
            )
            if not hits:
                hits = sorted(p for p in path.iterdir() if _is_nifti_file(p))
            if not hits:
                raise CohortError(
                    f"{path}: no T1 scans found (expected sub-*/[ses-*/]anat/*_T1w.nii.gz or NIfTI files)"
                )
            for hit in hits:
                scan = describe_input(hit)
                found.setdefault(scan.path, scan)
        elif path.exists():
            if not is_nifti_name(path):
                raise CohortError(f"{path}: not a NIfTI file (.nii or .nii.gz)")
            scan = describe_input(path)
            found.setdefault(scan.path, scan)
        else:
            raise CohortError(f"{path}: no such file or folder")
    return sorted(found.values(), key=lambda s: str(s.path))


def plan_outputs(scans: Sequence[ScanInput], out: str | Path) -> list[Path]:
    """Output NIfTI path per scan: ``out`` itself for one scan when it ends in .nii[.gz], else
    ``out/<input stem>.nii.gz``; CohortError when two inputs would write the same file."""
    out = Path(out)
    if is_nifti_name(out):
        if len(scans) != 1:
            raise CohortError(f"-o {out}: a file name needs exactly one input scan, got {len(scans)} (give a folder)")
        if out.resolve() == scans[0].path.resolve():
            raise CohortError(f"-o {out}: would overwrite the input scan; choose another output")
        return [out]
    outputs = [out / f"{scan.stem}.nii.gz" for scan in scans]
    seen: dict[Path, Path] = {}
    for scan, output in zip(scans, outputs):
        if output.resolve() == scan.path.resolve():
            raise CohortError(f"-o {out}: would overwrite the input {scan.path}; choose another output")
        if output in seen:
            raise CohortError(f"inputs {seen[output]} and {scan.path} would both write {output}; rename one")
        seen[output] = scan.path
    return outputs


def _read_tsv(path: Path):
    import pandas as pd

    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise CohortError(f"{path}: unreadable TSV ({str(exc).splitlines()[0]})") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    return df


_DIAGNOSIS_COLUMNS = ("diagnosis", "dx", "group")


def _session_months(label: str | None, row: dict) -> int | None:
    """Months since baseline: a ``months`` column of sessions.tsv, else the session label (``M06``,
    ``06``, ``bl``/``baseline`` = 0); no session at all = 0; None when unknown."""
    from ldae.data.cohort import parse_session

    value = row.get("months", "").strip()
    if value:
        try:
            return int(float(value))
        except ValueError:
            return None
    if label is None or label.lower() in ("bl", "baseline"):
        return 0
    try:
        return parse_session(label)
    except ValueError:
        return None


def _rows_by(path: Path, key: str) -> dict[str, dict]:
    """The rows of a BIDS TSV keyed by their ``key`` column; {} when the file does not exist."""
    if not path.is_file():
        return {}
    df = _read_tsv(path)
    if key not in df.columns:
        raise CohortError(f"{path}: missing column '{key}'")
    return {str(r[key]).strip(): r for r in df.to_dict("records")}


@functools.lru_cache(maxsize=64)
def _participants(root: Path) -> dict[str, dict]:
    return _rows_by(root / "participants.tsv", "participant_id")


@functools.lru_cache(maxsize=1024)
def _sessions(root: Path, subject: str) -> dict[str, dict]:
    return _rows_by(root / f"sub-{subject}" / f"sub-{subject}_sessions.tsv", "session_id")


def cohort_rows(scans: Sequence[ScanInput], outputs: Sequence[Path]) -> tuple[list[dict], list[str]]:
    """Cohort CSV rows for preprocessed scans, and one reason per scan left out.

    Rule (the cohort schema needs diagnosis and age, so unknown values are never invented):
    subject = ``sub-<label>``; session = months (sessions.tsv ``months``, else the label: ``ses-M06``
    = 6, ``ses-bl`` = 0, no session = 0); diagnosis = sessions.tsv ``diagnosis``/``dx``/``group``, else
    participants.tsv's; age = sessions.tsv ``age``, else participants.tsv ``age`` + months / 12 (age
    at baseline). A scan without a BIDS name, diagnosis or numeric age is left out and reported.
    """
    rows, skipped = [], []
    for scan, output in zip(scans, outputs):
        if scan.subject is None or scan.bids_root is None:
            skipped.append(f"{scan.path.name}: not a BIDS name in a BIDS tree (sub-*/[ses-*/]anat/)")
            continue
        participant = _participants(scan.bids_root).get(f"sub-{scan.subject}", {})
        session_row = _sessions(scan.bids_root, scan.subject).get(f"ses-{scan.session}", {}) if scan.session else {}
        months = _session_months(scan.session, session_row)
        if months is None:
            skipped.append(f"{scan.path.name}: session 'ses-{scan.session}' is not in months (add a 'months' "
                           f"column to sub-{scan.subject}_sessions.tsv)")
            continue
        diagnosis = ""
        for source in (session_row, participant):
            column = next((c for c in _DIAGNOSIS_COLUMNS if str(source.get(c, "")).strip()), None)
            if column:
                diagnosis = str(source[column]).strip()
                break
        age = _number(session_row.get("age"))
        if age is None:
            base = _number(participant.get("age"))
            age = None if base is None else round(base + months / 12.0, 2)
        missing = [name for name, value in (("diagnosis", diagnosis), ("age", age)) if value in ("", None)]
        if missing:
            skipped.append(f"{scan.path.name}: unknown {' and '.join(missing)} (participants.tsv / sessions.tsv)")
            continue
        rows.append({"subject": f"sub-{scan.subject}", "session": months, "path": str(Path(output).resolve()),
                     "diagnosis": diagnosis, "age": age})
    return rows, skipped


def _number(value: Any) -> float | None:
    try:
        number = float(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def append_cohort_csv(csv: str | Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` to a cohort CSV, appending to an existing one (a row with the same subject and
    session replaces the old one; other columns of the existing CSV are kept)."""
    import pandas as pd

    csv = Path(csv)
    new = pd.DataFrame(list(rows), columns=["subject", "session", "path", "diagnosis", "age"])
    if csv.is_file() and csv.stat().st_size > 0:
        try:
            old = pd.read_csv(csv, dtype={"subject": str})
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise CohortError(f"{csv}: cannot append to an unreadable CSV ({str(exc).splitlines()[0]})") from None
        missing = [c for c in ("subject", "session") if c not in old.columns]
        if missing:
            raise CohortError(f"{csv}: cannot append: missing column(s) {', '.join(missing)}")
        keys = set(zip(new["subject"].astype(str), new["session"].astype(int)))
        from ldae.data.cohort import parse_session

        keep = [
            (str(s), parse_session(m)) not in keys for s, m in zip(old["subject"], old["session"])
        ]
        new = pd.concat([old[keep], new], ignore_index=True)
    return write_csv(csv, new)

