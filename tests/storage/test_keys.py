from __future__ import annotations

import pytest

from storage.keys import image_key, model_key


def test_image_key() -> None:
    assert image_key("out", "job-1", 7, 1234) == "out/job-1/000007-1234.png"
    assert image_key("", "j", 0, 0) == "j/000000-0.png"
    assert image_key("/a/b/", "j", 1234567, 5) == "a/b/j/1234567-5.png"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("out", "a/b", 0, 1), "job_id"),
        (("out", "", 0, 1), "job_id"),
        (("out", "j", -1, 1), "index"),
        (("o//x", "j", 0, 1), "invalid storage key"),
        (("..", "j", 0, 1), "invalid storage key"),
    ],
)
def test_image_key_rejects(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        image_key(*args)


def test_model_key() -> None:
    sha = "ab" * 32
    assert model_key(sha) == f"models/sha256/{sha}.safetensors"
    for bad in ["AB" * 32, "ab" * 31, "../" + "a" * 61, ""]:
        with pytest.raises(ValueError, match="sha256"):
            model_key(bad)
