"""msc3870/validation.py: filenames that lie about themselves (bidi controls, invisible
characters) are refused, at upload and in a download's name; real names pass."""

from __future__ import annotations

import pytest

from msc3870.errors import InvalidParam
from msc3870.validation import clean_filename

from .helpers import MatrixClient, mxc_path

RLO = "\u202e"


@pytest.mark.parametrize(
    "name",
    [
        f"invoice{RLO}fdp.exe",  # displays as "invoiceexe.pdf"
        "report\u2066.pdf",  # left-to-right isolate
        "a\u200fb.txt",  # right-to-left mark
        "zero\u200bwidth.png",  # zero-width space
        "bom\ufeff.png",
        "line\u2028separator.txt",
        "c1\u0085control.txt",
    ],
)
def test_bidi_and_invisible_characters_are_refused(name: str) -> None:
    with pytest.raises(InvalidParam):
        clean_filename(name)


@pytest.mark.parametrize(
    "name",
    [
        "cat.png",
        "résumé d\u2019été.pdf",
        "\u0645\u0644\u0641.txt",  # Arabic: right-to-left letters need no control
        "\U0001f468\u200d\U0001f469\u200d\U0001f467.png",  # family emoji (zero-width joiners)
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645.txt",  # Persian, with a ZWNJ
    ],
)
def test_real_names_pass(name: str) -> None:
    assert clean_filename(name) == name


def test_an_rlo_filename_is_400_at_upload_and_download(alice: MatrixClient) -> None:
    response = alice.post(
        f"/_matrix/media/v3/upload?filename=invoice{RLO}fdp.exe", b"MZ", "text/plain"
    )
    assert response.status_code == 400
    assert response.json()["errcode"] == "M_INVALID_PARAM"
    ok = alice.post("/_matrix/media/v3/upload?filename=a.txt", b"text", "text/plain")
    path = mxc_path(ok.json()["content_uri"])
    download = alice.get(f"/_matrix/client/v1/media/download/{path}/invoice{RLO}fdp.exe")
    assert download.status_code == 400
    assert download.json()["errcode"] == "M_INVALID_PARAM"
