"""Ingest stage: Binance archive zips / CSVs -> canonical trade tables -> Parquet partitions.

Submodules: `reader` (read + validate one file: the public API over `schema`, `raw_file`,
`csv_parse` and `canonical`), `partitions` (typed Parquet partitions),
`download` (data.binance.vision archive with checksums, resume and retries).
"""
