"""Ingest stage: Binance archive zips / CSVs -> canonical trade tables -> Parquet partitions.

Submodules: `reader` (read + validate one file), `partitions` (typed Parquet partitions),
`download` (data.binance.vision archive with checksums, resume and retries).
"""
