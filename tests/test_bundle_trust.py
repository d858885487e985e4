"""Only what the manifest vouches for is loaded: real exported bundles, changed on disk.

Each bundle is a copy of one the project's own exporters wrote (tests/conftest.py). A
change is made as a careless copy or an attacker would: a link, a flipped byte, a file
added, a manifest value raised; where the attacker would also rewrite the manifest's
sha256, so does `vouch_for`. Every one must be a one-line BundleError (exit 6) before a
runtime reads the file, never a crash, a hang, or a file read from outside the bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest

from edgekit import bundle_integrity
from edgekit.bundle import load_bundle
from edgekit.errors import BundleError
from edgekit.integrity_cache import RECORD_FILE
from edgekit.runtimes.backends.executorch_program import ProgramError, read_program, read_program_data
from tests.conftest import assert_clean_failure, run_cli


def vouch_for(bundle: Path, name: str) -> None:
    """Make the manifest list `name` with its size and sha256 as they are now."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    data = (bundle / name).read_bytes()
    entries = [f for f in manifest["files"] if f["path"] != name]
    entries.append({"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest["files"] = sorted(entries, key=lambda f: f["path"])
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def audio(manifest: dict) -> dict:
    """The audio encoder's `extra` in a manifest dict."""
    return next(m for m in manifest["methods"] if m["name"] == "audio_encoder")["extra"]


def edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def flip_byte(path: Path, at: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0xFF]))


def run_fails(bundle: Path, contains: str) -> None:
    assert_clean_failure(run_cli("run", str(bundle), "-p", "Hi", "--max-new-tokens", "2"), code=6, contains=contains)


@pytest.fixture
def onnx_copy(onnx_fp32_bundle, tmp_path) -> Path:
    copy = tmp_path / "copy.edgekit"
    shutil.copytree(onnx_fp32_bundle, copy)
    return copy


@pytest.fixture
def et_copy(executorch_bundles, tmp_path) -> Path:
    """The e4b ExecuTorch bundle: its weights in model.ptd beside model.pte."""
    copy = tmp_path / "et.edgekit"
    shutil.copytree(executorch_bundles["e4b"].path, copy)
    return copy


# --- links and other files that are not the bundle's -------------------------------------


def test_linked_chat_template_is_refused_on_every_load(onnx_copy, tmp_path):
    """The template linked to a file outside, its hash updated to match: never rendered."""
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:SECRET:/root:/bin/sh\n")
    (onnx_copy / "chat_template.jinja").unlink()
    (onnx_copy / "chat_template.jinja").symlink_to(secret)
    vouch_for(onnx_copy, "chat_template.jinja")
    for verify in ("cached", "full", "sizes", "none"):
        with pytest.raises(BundleError, match="bundle file chat_template.jinja is a link"):
            load_bundle(onnx_copy, verify=verify)
    result = run_cli("run", str(onnx_copy), "-p", "Hi", "--max-new-tokens", "2")
    assert_clean_failure(result, code=6, contains="chat_template.jinja is a link")
    assert "SECRET" not in result.stdout + result.stderr


def test_links_anywhere_in_the_bundle_are_refused(onnx_copy, tmp_path):
    """A link to a file inside the bundle, a linked folder on a listed file's path, an
    unlisted link, a linked manifest: all refused; a link to the bundle itself is fine."""
    alias = tmp_path / "alias.edgekit"
    alias.symlink_to(onnx_copy)
    assert load_bundle(alias).path == onnx_copy.resolve()

    tokenizer = onnx_copy / "tokenizer_config.json"
    kept = tokenizer.read_bytes()
    tokenizer.unlink()
    tokenizer.symlink_to(onnx_copy / "tokenizer.json")
    with pytest.raises(BundleError, match="tokenizer_config.json is a link"):
        load_bundle(onnx_copy)
    tokenizer.unlink()
    tokenizer.write_bytes(kept)

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text("x")
    (onnx_copy / "extras").symlink_to(outside)
    with pytest.raises(BundleError, match="bundle file extras is a link"):
        load_bundle(onnx_copy)
    edit_manifest(onnx_copy, lambda m: m["files"].append(
        {"path": "extras/notes.txt", "size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}))
    with pytest.raises(BundleError, match=r"extras/notes.txt is a link \(its folder extras is\)"):
        load_bundle(onnx_copy, verify="none")
    (onnx_copy / "extras").unlink()
    edit_manifest(onnx_copy, lambda m: m.update(files=[f for f in m["files"] if f["path"] != "extras/notes.txt"]))

    (onnx_copy / ".weights").symlink_to(outside / "notes.txt")  # hidden files are let be; hidden links are not
    with pytest.raises(BundleError, match="bundle file .weights is a link"):
        load_bundle(onnx_copy, verify="none")
    (onnx_copy / ".weights").unlink()

    manifest = onnx_copy / "manifest.json"
    moved = tmp_path / "manifest.json"
    manifest.rename(moved)
    manifest.symlink_to(moved)
    with pytest.raises(BundleError, match="manifest.json is a link"):
        load_bundle(onnx_copy, verify="none")


def test_special_files_are_refused_without_hanging(onnx_copy):
    """A FIFO where a listed file should be would block a reader forever."""
    tokenizer = onnx_copy / "tokenizer_config.json"
    tokenizer.unlink()
    os.mkfifo(tokenizer)
    assert_clean_failure(run_cli("run", str(onnx_copy), "-p", "Hi", timeout=120), code=6,
                         contains="tokenizer_config.json is not a regular file")


def test_an_unlisted_file_is_refused_and_hidden_ones_let_be(onnx_copy):
    (onnx_copy / ".DS_Store").write_bytes(b"finder")
    (onnx_copy / ".cache").mkdir()
    (onnx_copy / ".cache" / "x").write_text("a tool's own")
    load_bundle(onnx_copy)
    (onnx_copy / "decoder_extra.onnx").write_bytes(b"graph nothing vouches for")
    run_fails(onnx_copy, "decoder_extra.onnx is not in the manifest")
    (onnx_copy / "decoder_extra.onnx").unlink()
    (onnx_copy / "sub").mkdir()
    (onnx_copy / "sub" / "weights.bin").write_bytes(b"w")
    with pytest.raises(BundleError, match="sub/weights.bin is not in the manifest"):
        load_bundle(onnx_copy, verify="none")


# --- changed bytes -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["decoder.onnx.data", "vision_encoder.onnx.data", "genai_config.json"])
def test_a_changed_byte_is_caught_by_the_default_load(onnx_copy, name):
    flip_byte(onnx_copy / name, (onnx_copy / name).stat().st_size // 2)
    run_fails(onnx_copy, f"bundle file {name} is corrupt")


def test_a_change_after_the_first_open_is_caught(onnx_copy):
    """The first open hashes and remembers; a later change is caught even when the file's
    size and mtime are put back as they were (its ctime cannot be)."""
    settle()
    load_bundle(onnx_copy)
    data = onnx_copy / "decoder.onnx.data"
    assert str(data) in _record()["files"]
    before = data.stat()
    flip_byte(data, before.st_size - 1)
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert data.stat().st_size == before.st_size and data.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(BundleError, match="decoder.onnx.data is corrupt"):
        load_bundle(onnx_copy)


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """Names of the files bundle loads read whole, in order (the real hashing runs)."""
    names: list[str] = []
    real = bundle_integrity._hash_as_stated

    def spy(path, st, advance):
        names.append(path.name)
        return real(path, st, advance)

    monkeypatch.setattr(bundle_integrity, "_hash_as_stated", spy)
    return names


def test_the_first_open_hashes_and_later_opens_only_stat(onnx_copy, hashed):
    settle()
    files = {f.path for f in load_bundle(onnx_copy).manifest.files}
    assert set(hashed) == files
    hashed.clear()
    load_bundle(onnx_copy)
    assert hashed == []
    load_bundle(onnx_copy, verify="full")  # full always reads everything
    assert set(hashed) == files


def test_files_just_written_are_hashed_until_they_settle(onnx_copy, hashed):
    """A write within the clock's granularity would leave a file's stat as it was: a file
    changed in the last two seconds is not remembered yet."""
    (onnx_copy / "genai_config.json").write_bytes((onnx_copy / "genai_config.json").read_bytes())
    load_bundle(onnx_copy)
    load_bundle(onnx_copy)
    assert hashed.count("genai_config.json") == 2


@pytest.mark.parametrize("cache", ["unwritable", "a_file", "corrupt"])
def test_a_cache_that_cannot_be_used_means_hashing_every_time(onnx_copy, tmp_path, monkeypatch, hashed, cache):
    base = {"unwritable": Path("/proc/self"), "a_file": tmp_path / "file", "corrupt": tmp_path / "cache"}[cache]
    if cache == "a_file":
        base.write_text("not a folder")
    elif cache == "corrupt":
        (base / "edgekit").mkdir(parents=True)
        (base / "edgekit" / RECORD_FILE).write_bytes(b"{not json\xff")
    monkeypatch.setenv("XDG_CACHE_HOME", str(base))
    settle()
    for _ in range(2):
        load_bundle(onnx_copy)
    per_load = len(json.loads((onnx_copy / "manifest.json").read_text())["files"])
    assert len(hashed) == (2 * per_load if cache != "corrupt" else per_load)  # a corrupt record is rewritten


def test_a_record_others_can_write_vouches_for_nothing(onnx_copy):
    """A record that says a tampered file is fine, in a file another user could have
    written: it is not read."""
    data = onnx_copy / "decoder.onnx.data"
    flip_byte(data, 7)
    settle()
    sha = next(f["sha256"] for f in json.loads((onnx_copy / "manifest.json").read_text())["files"]
               if f["path"] == data.name)
    st = data.stat()
    record = Path(os.environ["XDG_CACHE_HOME"]) / "edgekit" / RECORD_FILE
    record.parent.mkdir(parents=True, exist_ok=True)
    saved = record.read_bytes() if record.exists() else None
    key = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, sha]
    record.write_text(json.dumps({"format": 1, "files": {str(data.resolve()): key}}))
    record.chmod(0o666)
    try:
        with pytest.raises(BundleError, match="decoder.onnx.data is corrupt"):
            load_bundle(onnx_copy)
    finally:
        record.unlink()
        if saved is not None:
            record.write_bytes(saved)


def settle() -> None:
    """Let just-copied files pass the two seconds within which a file is not remembered."""
    import time

    time.sleep(2.1)


def _record() -> dict:
    return json.loads((Path(os.environ["XDG_CACHE_HOME"]) / "edgekit" / RECORD_FILE).read_text())


@pytest.mark.executorch_bundles
def test_a_changed_program_byte_is_caught(et_copy):
    flip_byte(et_copy / "model.pte", (et_copy / "model.pte").stat().st_size // 2)
    run_fails(et_copy, "bundle file model.pte is corrupt")


# --- manifest values ---------------------------------------------------------------------


def test_onnx_max_context_beyond_the_export_is_refused(onnx_copy):
    exported = json.loads((onnx_copy / "genai_config.json").read_text())["model"]["context_length"]
    edit_manifest(onnx_copy, lambda m: m.update(max_context=exported * 4))
    run_fails(onnx_copy, f"max_context {exported * 4}, but the decoder was exported for {exported} tokens")
    edit_manifest(onnx_copy, lambda m: m.update(max_context=exported // 2))  # less is fine
    load_bundle(onnx_copy)


@pytest.mark.parametrize("change,message", [
    (lambda m: m["special_tokens"].update(eos_ids=[]), "'special_tokens.eos_ids' must not be empty"),
    (lambda m: m["special_tokens"].update(image_token_id=10**9), "'special_tokens.image_token_id' is 1000000000"),
    (lambda m: m["model"].update(hidden_size=0), "'model.hidden_size' must be at least 1"),
    (lambda m: audio(m).update(min_frames="many"), "'methods.audio_encoder.extra.min_frames' must be int"),
    (lambda m: audio(m).update(frame_multiple=0), "'methods.audio_encoder.extra.frame_multiple' must be at least 1"),
    (lambda m: audio(m).update(min_frames=10**12), "the audio encoder's 1000000000000 frames needs"),
])
def test_manifest_values_the_runtime_cannot_use_are_refused(onnx_copy, change, message):
    edit_manifest(onnx_copy, change)
    run_fails(onnx_copy, message)


@pytest.mark.executorch_bundles
def test_executorch_manifest_must_agree_with_its_program(et_copy):
    program = read_program(et_copy / "model.pte")
    context, seq_len = program.constant("get_max_context_len"), program.constant("get_max_seq_len")
    manifest = json.loads((et_copy / "manifest.json").read_text())
    assert manifest["max_context"] == context
    edit_manifest(et_copy, lambda m: m.update(max_context=context + 1))
    run_fails(et_copy, f"the decoder was exported for {context} tokens (model.pte get_max_context_len)")
    edit_manifest(et_copy, lambda m: m.update(max_context=context))

    def longer_chunks(m):
        m["extra"]["max_seq_len"] = seq_len * 2
        next(x for x in m["methods"] if x["name"] == "text_decoder")["extra"]["max_seq_len"] = seq_len * 2
    edit_manifest(et_copy, longer_chunks)
    run_fails(et_copy, f"takes at most {seq_len} tokens per call")
    edit_manifest(et_copy, lambda m: m.__setitem__("methods", m["methods"] + [{**m["methods"][0], "name": "decode"}]))
    with pytest.raises(BundleError, match="lists method decode, which model.pte does not have"):
        load_bundle(et_copy)


# --- a corrupt program is an error, not an abort -------------------------------------------


@pytest.mark.executorch_bundles
@pytest.mark.parametrize("damage", ["random", "tables", "segments", "data_file"])
def test_a_corrupt_program_is_a_one_line_error(et_copy, damage):
    """Rewritten with its manifest (so the hashes match): random bytes of the right size
    aborted the process in ExecuTorch, garbage over its tables segfaulted it."""
    rng = random.Random(0)
    pte, ptd = et_copy / "model.pte", et_copy / "model.ptd"
    data = bytearray(pte.read_bytes())
    if damage == "random":
        data = bytearray(rng.randbytes(len(data)))
    elif damage == "tables":
        data[64:4096] = rng.randbytes(4096 - 64)
    elif damage == "segments":  # the header's segment offset moved past the end of the file
        struct.pack_into("<Q", data, 24, len(data) + 4096)
    else:
        ptd.write_bytes(rng.randbytes(ptd.stat().st_size))
        vouch_for(et_copy, "model.ptd")
    pte.write_bytes(bytes(data))
    vouch_for(et_copy, "model.pte")
    name = "model.ptd" if damage == "data_file" else "model.pte"
    run_fails(et_copy, f"bundle file {name} is not a valid ExecuTorch")


@pytest.mark.executorch_bundles
def test_program_reader_raises_only_its_own_error_on_any_damage(executorch_bundles, tmp_path):
    """600 programs with one to four bytes of the flatbuffer changed: each is read or is
    a ProgramError, never another exception (the reader is what stands before ExecuTorch)."""
    source = executorch_bundles["e4b"].path
    original = (source / "model.pte").read_bytes()
    tables_end = struct.unpack_from("<Q", original, 16)[0]
    rng = random.Random(1)
    damaged = tmp_path / "model.pte"
    outcomes = {"read": 0, "refused": 0}
    for _ in range(600):
        data = bytearray(original)
        for _ in range(rng.choice((1, 1, 2, 4))):
            data[rng.randrange(8, tables_end)] = rng.randrange(256)
        damaged.write_bytes(bytes(data))
        try:
            read_program(damaged)
            outcomes["read"] += 1
        except ProgramError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 400, outcomes
    data_file = (source / "model.ptd").read_bytes()
    for _ in range(300):
        data = bytearray(data_file)
        data[rng.randrange(0, min(len(data), 4096))] = rng.randrange(256)
        damaged.write_bytes(bytes(data))
        try:
            read_program_data(damaged)
        except ProgramError:
            pass


def test_program_reader_refuses_what_is_not_a_program(onnx_copy):
    for name in ("decoder.onnx", "tokenizer.json"):
        with pytest.raises(ProgramError, match="not an ExecuTorch program"):
            read_program(onnx_copy / name)
        with pytest.raises(ProgramError, match="not an ExecuTorch data file"):
            read_program_data(onnx_copy / name)
