"""The tests' S3 parts: moto's credentials and a fresh bucket (the fixtures are in tests/conftest.py)."""

from __future__ import annotations

#: the credentials the tests' S3 server accepts (moto takes any)
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def new_bucket(endpoint: str):
    """A fresh bucket on the tests' S3 server; returns (boto3 client, bucket name)."""
    import uuid

    client = client_of(endpoint)
    name = f"trtflow-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


def client_of(endpoint: str):
    """A boto3 S3 client of the tests' server."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
