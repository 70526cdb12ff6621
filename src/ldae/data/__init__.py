"""Data layer: cohort CSV schema and splits, MONAI transforms, Lightning data modules, bundled data."""
