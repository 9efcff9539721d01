"""Create the bucket that ``FARM_STORAGE_URL`` names, unless it exists: the one-shot
``bucket`` service of docker-compose.yml, run before anything writes to the store.

It goes through the farm's own S3 code, so it reads the same ``AWS_*`` variables (endpoint,
credentials, region) as the API and the workers and fails the same way they would.
"""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

from farm.config import load
from storage import StorageError, open_store
from storage.s3 import S3Store


def main() -> int:
    url = load().storage_url
    if urlsplit(url).scheme != "s3":
        print(f"FARM_STORAGE_URL={url!r} is no s3:// URL: no bucket to create", file=sys.stderr)
        return 2
    try:
        store = open_store(url)  # the bucket, prefix and ?endpoint=&region= of the URL
        assert isinstance(store, S3Store)
        store.create_bucket()
    except (StorageError, ValueError) as exc:
        print(f"cannot create the bucket of {url!r}: {exc}", file=sys.stderr)
        return 1
    print(f"bucket ready: {store.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
