from tasks.stores import s3  # noqa: F401
