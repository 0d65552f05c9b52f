"""S3 access of the portal: presigned URLs for one object at a time, and listings.

The bytes go between the browser and S3 directly; the portal only signs. A URL names one key and
one method and expires after ``expires_s`` seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import boto3
from botocore.config import Config


@dataclass(frozen=True)
class Storage:
    bucket: str
    endpoint_url: str | None = None
    region: str | None = None
    expires_s: int = 900

    def _client(self):
        # Signature v4 with the path-style addresses S3-compatible stores (MinIO, PowerScale) expect.
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))

    def upload_url(self, key: str) -> str:
        return self._client().generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.expires_s)

    def download_url(self, key: str) -> str:
        return self._client().generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.expires_s)

    def list(self, prefix: str, limit: int = 1000) -> list[dict]:
        """Objects under ``prefix`` (key relative to it, size, time), at most ``limit``."""
        objects = []
        for page in self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                objects.append({"path": obj["Key"][len(prefix):], "size": obj["Size"],
                                "modified": obj["LastModified"].isoformat()})
                if len(objects) >= limit:
                    return objects
        return objects
