"""The built-in stores; each registers itself with ``tasks.store`` on import."""

from tasks.stores import local  # noqa: F401
from tasks.stores import s3  # noqa: F401
