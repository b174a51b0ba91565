"""Training: the loop, Muon + AdamW, device/precision helpers, DDP/FSDP2, MLflow tracking."""
