"""Plumbing every stage shares: errors, typed configs, lineage and atomic writes, stage stamps, native builds."""
