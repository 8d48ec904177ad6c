"""``python -m app inspect``: what it prints and its exit status, for files and URLs."""

from __future__ import annotations

import http.server
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from adapters.provenance.credentials import ContentCredentials
from adapters.provenance.dev_certificate import DevelopmentChain, generate_development_chain
from adapters.provenance.invisible_mark import InvisibleMark
from adapters.provenance.marks import ProvenanceMarks
from app.cli import main
from app.inspect_command import SourceUnreadable, read_source
from tests.unit.provenance_samples import facts, one_pixel_changed

FACTS = facts(generation_id=77, style_id=5, artist=None, prompt="ink", lora_checksum=None)


@pytest.fixture(scope="module")
def chain() -> DevelopmentChain:
    return generate_development_chain()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, chain: DevelopmentChain) -> dict[str, Path]:
    """A signed and marked PNG, its JPEG copy, an unsigned PNG and a file that is no image."""
    root = tmp_path_factory.mktemp("inspect")
    gradient = Image.linear_gradient("L").resize((512, 512))
    image = Image.merge("RGB", (gradient, gradient.rotate(90), gradient))
    signed = ProvenanceMarks(
        include_prompt=True,
        invisible_mark=InvisibleMark(),
        credentials=ContentCredentials(
            private_key_pem=chain.private_key_pem,
            certificate_chain_pem=chain.certificate_chain_pem,
        ),
    ).mark(image, FACTS)
    names = (
        "signed.png",
        "copy.jpg",
        "half.png",
        "tampered.png",
        "plain.png",
        "notes.txt",
        "root.pem",
        "bomb.png",
        "huge-text.png",
    )
    paths = {name: root / name for name in names}
    paths["signed.png"].write_bytes(signed.png)
    with Image.open(io.BytesIO(signed.png)) as decoded:
        pixels = decoded.convert("RGB")
    pixels.save(paths["copy.jpg"], quality=80)
    pixels.resize((256, 256), Image.Resampling.BICUBIC).save(paths["half.png"])
    # One pixel changed, every other chunk (the manifest too) kept: a file that still decodes.
    paths["tampered.png"].write_bytes(one_pixel_changed(signed.png, at=(5, 5)))
    image.save(paths["plain.png"])
    paths["notes.txt"].write_text("not an image")
    paths["root.pem"].write_bytes(chain.root_certificate_pem)
    # 5000x5000 of one colour: a few kilobytes on disk, 25 M pixels decoded.
    Image.new("L", (5000, 5000)).save(paths["bomb.png"])
    # A compressed text chunk that inflates past Pillow's limit (1 MB).
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * (2 * 1024 * 1024), zip=True)
    image.save(paths["huge-text.png"], pnginfo=info)
    return paths


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")  # no stray .env is read


def test_a_signed_png_validates_and_every_mark_is_printed(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(files["signed.png"])]) == 0
    out = capsys.readouterr().out
    assert "content credentials: untrusted" in out
    assert "\n  made by: stylelicense-worker " in out
    assert "\n  c2pa.created: " in out and "generation_id 77" in out and "style_id 5" in out
    assert "\n  training and mining: ai_generative_training notAllowed, " in out
    assert "digital source type (XMP): http://cv.iptc.org/newscodes/digitalsourcetype/" in out
    assert "  ink\n" in out and "Generation id: 77" in out
    assert "invisible mark: generation id 77" in out and out.endswith("verified: yes\n")


def test_require_trusted_refuses_the_development_certificate(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", "--require-trusted", str(files["signed.png"])]) == 1
    assert capsys.readouterr().out.endswith("verified: no\n")


def test_a_signer_under_a_given_trust_anchor_is_trusted(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["inspect", "--require-trusted", "--trust-anchors", str(files["root.pem"])]
    assert main([*argv, str(files["signed.png"])]) == 0
    out = capsys.readouterr().out
    assert "content credentials: valid" in out and out.endswith("verified: yes\n")
    assert main([*argv[:-1], str(files["notes.txt"]), str(files["signed.png"])]) == 2
    assert "trust_anchors_pem" in capsys.readouterr().err


def test_json_for_machines(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--json", str(files["signed.png"])]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] is True and report["format"] == "PNG"
    assert report["content_credentials"]["state"] == "untrusted"
    assert report["content_credentials"]["manifest_label"].startswith("urn:c2pa:")
    assert report["metadata"]["generation_id"] == 77
    assert report["invisible_mark"]["generation_id"] == 77


def test_a_jpeg_copy_has_lost_its_credentials_but_not_its_mark(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", "--json", str(files["copy.jpg"])]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "JPEG" and report["content_credentials"]["state"] == "none"
    assert report["invisible_mark"]["generation_id"] == 77 and report["verified"] is False


def test_a_half_size_copy_still_names_its_generation(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(files["half.png"])]) == 1
    out = capsys.readouterr().out
    assert "content credentials: none" in out and "invisible mark: generation id 77" in out


def test_a_tampered_file_is_reported_and_fails(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", "--json", str(files["tampered.png"])]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["content_credentials"]["state"] == "tampered"
    assert "assertion.dataHash.mismatch" in report["content_credentials"]["validation_codes"]


def test_a_plain_png_carries_nothing(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", "--json", str(files["plain.png"])]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["content_credentials"]["present"] is False
    assert report["invisible_mark"]["generation_id"] is None
    assert report["metadata"]["parameters"] is None


def test_what_cannot_be_read_exits_2_naming_it(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(files["notes.txt"])]) == 2
    assert "not a readable PNG or JPEG image" in capsys.readouterr().err
    for name in ("bomb.png", "huge-text.png"):
        assert main(["inspect", str(files[name])]) == 2, name
        assert "inspect: " in capsys.readouterr().err
    missing = files["notes.txt"].parent / "missing.png"
    assert main(["inspect", str(missing)]) == 2
    assert f"{missing}: No such file or directory" in capsys.readouterr().err


@pytest.fixture
def http_root(files: dict[str, Path]) -> Iterator[str]:
    directory = str(files["signed.png"].parent)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=directory, **kwargs)  # type: ignore[arg-type]

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_download_that_never_ends_is_cut_at_the_deadline() -> None:
    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # pylint: disable=invalid-name
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    began = time.monotonic()
    try:
        with pytest.raises(SourceUnreadable, match="not downloaded within 1 s"):
            read_source(f"http://127.0.0.1:{server.server_address[1]}/slow.png", timeout=1.0)
    finally:
        server.shutdown()
        server.server_close()
    assert time.monotonic() - began < 5


def test_a_url_is_read_over_http(http_root: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", f"{http_root}/signed.png"]) == 0
    assert "invisible mark: generation id 77" in capsys.readouterr().out
    assert main(["inspect", f"{http_root}/absent.png"]) == 2
    assert "404" in capsys.readouterr().err
