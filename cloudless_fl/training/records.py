"""The names of a message's records (server ↔ region), apart from the protocol so the thin region
ClientApp can read them without importing PyTorch."""

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
INFO = "info"
CORRECTION = "drift-correction"  # ASGD-GA's drift correction `c − c_r` for a job's local steps, in the job's codec
