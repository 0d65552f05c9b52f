"""S3 access of the portal: presigned URLs for one object at a time, and listings.

The bytes go between the browser and S3 directly; the portal only signs. A URL names one key and
one method and expires after ``expires_s`` seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from dinomx.errors import UserError


class StorageUnavailable(UserError, RuntimeError):
    """The S3 store did not answer, refused the portal's credentials, or has no such bucket."""


@dataclass(frozen=True)
class Storage:
    bucket: str
    endpoint_url: str | None = None
    region: str | None = None
    expires_s: int = 900

    def _where(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint_url or 'AWS'}"

    def _client(self):
        # Signature v4 with the path-style addresses S3-compatible stores (MinIO, PowerScale) expect.
        # A page waits seconds, not a minute, on a store that does not answer.
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, connect_timeout=5,
                                          read_timeout=30, retries={"max_attempts": 2, "mode": "standard"}))

    def upload_url(self, key: str) -> str:
        return self._sign("put_object", key)

    def download_url(self, key: str) -> str:
        return self._sign("get_object", key)

    def _sign(self, method: str, key: str) -> str:
        try:
            return self._client().generate_presigned_url(method, Params={"Bucket": self.bucket, "Key": key},
                                                         ExpiresIn=self.expires_s)
        except BotoCoreError as exc:  # no credentials to sign with
            raise StorageUnavailable(f"storage {self._where()}: cannot sign a URL: {exc}; set the portal's AWS_* "
                                     "credentials") from None

    def list(self, prefix: str, limit: int = 1000) -> list[dict]:
        """Objects under ``prefix`` (key relative to it, size, time), at most ``limit``."""
        objects = []
        try:
            for page in self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    objects.append({"path": obj["Key"][len(prefix):], "size": obj["Size"],
                                    "modified": obj["LastModified"].isoformat()})
                    if len(objects) >= limit:
                        return objects
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable(f"storage {self._where()} is unreachable or refuses the portal: {exc}") from None
        return objects
