"""trtflow stages: plain, typed functions (one module per stage) and their thin Prefect wrappers."""

import os

# Stage modules log to "trtflow.*"; Prefect forwards those records to the run's logs (UI included)
# only if told before it configures logging. No network here: telemetry would only log errors.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "trtflow")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
