"""CPU unit tests: the bundle format (manifest, atomic writer, loader, `edgekit inspect`).

No model, no torch: bundles here hold a few small fake files. Fast (a few seconds).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import assert_clean_failure, run_cli
from edgekit import bundle as bundle_mod
from edgekit.bundle import BundleWriter, inspect_bundle, load_bundle, update_manifest, verify_files
from edgekit.errors import BundleError, ExportError, InputError
from edgekit.manifest import (
    MANIFEST_FILE, METHOD_TEXT_DECODER, METHOD_TOKEN_EMBEDDING, SCHEMA_VERSION, AudioPreprocessing, ImagePreprocessing,
    Manifest, MethodSpec, ModelInfo, SpecialTokens, TensorSpec, format_names, schema_json,
)
from edgekit.models.gemma4.special_tokens import layout_for

SCHEMA_FILE = Path(bundle_mod.__file__).parent / "manifest.schema.json"
SCHEMA = json.loads(SCHEMA_FILE.read_text())


def make_manifest(**overrides) -> Manifest:
    hidden = 64
    methods = [
        MethodSpec(METHOD_TOKEN_EMBEDDING, "embedding.onnx",
                   inputs=[TensorSpec("input_ids", "int64", (1, "seq_len"))],
                   outputs=[TensorSpec("embeds", "float32", (1, "seq_len", hidden))]),
        MethodSpec(METHOD_TEXT_DECODER, "decoder.onnx",
                   inputs=[TensorSpec("inputs_embeds", "float32", (1, "seq_len", hidden)),
                           TensorSpec("cache_position", "int64", ("seq_len",))],
                   outputs=[TensorSpec("logits", "float32", (1, "seq_len", 512))],
                   extra={"kv_layers": 2}),
    ]
    fields = dict(
        model=ModelInfo(name="tiny-e2b", source_config_sha256="ab" * 32, size="custom", num_layers=2,
                        hidden_size=hidden, vocab_size=512),
        device="pi5", format="onnx", backend="cpu", execution_providers=["CPUExecutionProvider"],
        recipe="int4", quant_schemes={METHOD_TEXT_DECODER: "int4-b32", METHOD_TOKEN_EMBEDDING: "int8-emb"},
        methods=methods, max_context=256, prefill_chunk=128, special_tokens=SpecialTokens.from_layout(layout_for(512)),
        audio_preprocessing=AudioPreprocessing(sampling_rate=16000, feature_size=128, frame_length=320,
                                               hop_length=160, fft_length=512, ms_per_token=40, max_tokens=750),
        image_preprocessing=ImagePreprocessing(patch_size=16, pooling_kernel_size=3, max_soft_tokens=280),
        extra={"opset": 21, "ir_version": 10},
    )
    return Manifest(**{**fields, **overrides})


def write_bundle(target: Path, *, overwrite: bool = False, payload: bytes = b"decoder-weights" * 100) -> Path:
    src = target.parent / "src-tokenizer.json"
    src.write_text('{"model": {}}')
    with BundleWriter(target, overwrite=overwrite) as w:
        w.path_for("decoder.onnx").write_bytes(b"graph")
        w.path_for("decoder.onnx.data").write_bytes(payload)
        w.path_for("embedding.onnx").write_bytes(b"emb")
        w.add_file(src, "tokenizer.json")
        w.write_text("chat_template.jinja", "{{ messages }}")
        w.finalize(make_manifest())
    src.unlink()
    return target


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- manifest ----------------------------------------------------------------------------


def test_manifest_round_trip():
    m = make_manifest()
    data = json.loads(json.dumps(m.to_dict()))
    assert Manifest.from_dict(data) == m
    assert list(data)[:3] == ["schema_version", "edgekit_version", "created_at"]  # field order is key order
    assert m.method(METHOD_TEXT_DECODER).inputs[1].is_dynamic
    assert m.special_tokens.eos_ids == (1, 6)  # <eos>, <turn|> in the packed 512 layout


def test_committed_schema_is_the_generated_one():
    # Regenerate with: python -m edgekit.manifest --schema > edgekit/manifest.schema.json
    assert SCHEMA_FILE.read_text() == schema_json()
    assert set(SCHEMA["properties"]) == set(Manifest.model_fields) == set(SCHEMA["required"])
    assert SCHEMA["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    assert SCHEMA["properties"]["format"]["enum"] == list(format_names())  # one table: edgekit.formats


def test_schema_cli_prints_the_schema():
    result = subprocess.run([sys.executable, "-m", "edgekit.manifest", "--schema"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == SCHEMA_FILE.read_text()


def test_written_manifest_validates_against_schema(tmp_path):
    target = write_bundle(tmp_path / "tiny.edgekit")
    data = json.loads((target / MANIFEST_FILE).read_text())
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(data, SCHEMA, cls=jsonschema.Draft202012Validator)
    # A text-only manifest (no towers, no template) is valid too.
    text_only = make_manifest(audio_preprocessing=None, image_preprocessing=None, chat_template=None).to_dict()
    jsonschema.validate(text_only, SCHEMA, cls=jsonschema.Draft202012Validator)
    for bad in ({**data, "format": "tflite"}, {**data, "files": [{"path": "../x", "size": 1, "sha256": "0" * 64}]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, SCHEMA, cls=jsonschema.Draft202012Validator)


def test_from_dict_errors_name_the_key():
    data = make_manifest().to_dict()
    with pytest.raises(BundleError, match="schema 3 is newer than this edgekit understands \\(2\\); upgrade edgekit"):
        Manifest.from_dict({**data, "schema_version": 3})
    with pytest.raises(BundleError, match="schema 1 is older than this edgekit reads \\(2\\); export the bundle again"):
        Manifest.from_dict({**data, "schema_version": 1})
    del data["model"]["vocab_size"]
    with pytest.raises(BundleError, match="missing key 'model.vocab_size'"):
        Manifest.from_dict(data)
    data = make_manifest().to_dict()
    data["methods"][1]["inputs"][0]["dtype"] = "torch.float32"
    with pytest.raises(BundleError, match=r"key 'methods\[1\].inputs\[0\].dtype'"):
        Manifest.from_dict(data)
    with pytest.raises(BundleError, match="'max_context' must be an integer, got '256'"):
        Manifest.from_dict({**make_manifest().to_dict(), "max_context": "256"})
    with pytest.raises(BundleError, match=r"'files\[0\].path' is not a plain relative path"):
        Manifest.from_dict({**make_manifest().to_dict(),
                            "files": [{"path": "/etc/passwd", "size": 1, "sha256": "0" * 64}]})
    # Unknown keys are ignored: an additive change does not break older readers.
    assert Manifest.from_dict({**make_manifest().to_dict(), "future_key": 1}).device == "pi5"


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["special_tokens"].update(eos_ids=[]), "key 'special_tokens.eos_ids' must not be empty"),
    (lambda d: d.update(prefill_chunk=257), "key 'prefill_chunk' must be at most max_context (256)"),
    (lambda d: d.update(max_context=0), "key 'max_context'"),
    (lambda d: d.update(format="tflite"), "key 'format' must be one of onnx, executorch, coreml"),
    (lambda d: d["model"].update(size="e9b"), "key 'model.size' must be one of"),
    (lambda d: d.update(methods=d["methods"] * 2), "key 'methods' lists method 'text_decoder' twice"),
    (lambda d: d.update(files=[{"path": "a", "size": -1, "sha256": "0" * 64}]), "key 'files[0].size'"),
    (lambda d: d.update(files=[{"path": "a", "size": 1, "sha256": "A" * 64}]), "key 'files[0].sha256'"),
    (lambda d: d.update(files=[{"path": "a", "size": 1, "sha256": "0" * 64}] * 2), "lists file 'a' twice"),
    (lambda d: d["methods"][0]["inputs"][0].update(shape=[True]), "key 'methods[0].inputs[0].shape[0]' must be a size"),
    (lambda d: d.update(chat_template="../t.jinja"), "key 'chat_template' is not a plain relative path"),
    (lambda d: d.update(model=[]), "key 'model' must be an object"),
    (lambda d: d["quant_schemes"].update(text_decoder=4), "key 'quant_schemes.text_decoder' must be a string"),
    (lambda d: d["quant_schemes"].update({"a\nb": 4}), "key 'quant_schemes.'a\\nb'' must be a string"),
    (lambda d: d["audio_preprocessing"].update(mel_floor=float("nan")), "key 'audio_preprocessing.mel_floor'"),
])
def test_each_failure_is_one_bundle_error_naming_the_key(edit, message):
    data = make_manifest().to_dict()
    edit(data)
    with pytest.raises(BundleError) as info:
        Manifest.from_dict(data)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_constructing_a_bad_spec_is_a_bundle_error():
    # Exporters build these directly; a mistake there is a BundleError too, not a pydantic one.
    with pytest.raises(BundleError, match="key 'dtype'"):
        TensorSpec("x", "torch.float32", (1,))
    with pytest.raises(BundleError, match="key 'max_context'"):
        make_manifest(max_context=-1)


def _schema_breaches(value, schema: dict, path: tuple) -> list[tuple[tuple, object]]:
    """(key path, a value that breaks a constraint there) for every value constraint of the
    schema that `value` (a valid manifest dict) reaches."""
    if "$ref" in schema:
        schema = SCHEMA["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    for alternatives in (schema.get("oneOf"), schema.get("anyOf")):
        if alternatives and value is not None:
            return [b for alt in alternatives if alt.get("type") != "null" for b in _schema_breaches(value, alt, path)]
    found = []
    if "minimum" in schema:
        found.append((path, schema["minimum"] - 1))
    if "minItems" in schema:
        found.append((path, []))
    if "minLength" in schema:
        found.append((path, ""))
    if "enum" in schema or "const" in schema:
        found.append((path, "not-one-of-these"))
    if "pattern" in schema:
        found.append((path, "Not A Hex Digest"))
    if "not" in schema:
        found.append((path, "../outside"))
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                found += _schema_breaches(value[key], sub, (*path, key))
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            found += [b for key in value if key not in schema.get("properties", {})
                      for b in _schema_breaches(value[key], extra, (*path, key))]
    if isinstance(value, list) and value and "items" in schema:
        found += _schema_breaches(value[0], schema["items"], (*path, 0))
    return found


def test_every_value_the_schema_forbids_is_refused_at_load(tmp_path):
    """The loader enforces each value constraint of manifest.schema.json (minimum, minItems,
    minLength, enum, const, pattern, not), found by walking the schema: an empty eos_ids, a
    zero hidden size, a negative token id, a path out of the bundle, ..."""
    target = write_bundle(tmp_path / "tiny.edgekit")
    good = json.loads((target / MANIFEST_FILE).read_text())
    breaches = _schema_breaches(good, SCHEMA, ())
    assert len(breaches) > 10 and (("special_tokens", "eos_ids"), []) in breaches
    for path, bad in breaches:
        data = json.loads(json.dumps(good))
        holder = data
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = bad
        (target / MANIFEST_FILE).write_text(json.dumps(data))
        with pytest.raises(BundleError):
            load_bundle(target, verify="none")
            pytest.fail(f"loaded with {'.'.join(map(str, path))} = {bad!r}")
    (target / MANIFEST_FILE).write_text(json.dumps(good))
    load_bundle(target)


# --- atomic writing ----------------------------------------------------------------------


def test_write_success(tmp_path):
    target = write_bundle(tmp_path / "tiny.edgekit")
    b = load_bundle(target, verify="full")
    assert [f.path for f in b.manifest.files] == ["chat_template.jinja", "decoder.onnx", "decoder.onnx.data",
                                                  "embedding.onnx", "tokenizer.json"]
    assert b.file("decoder.onnx.data").read_bytes() == b"decoder-weights" * 100
    assert b.manifest.total_size == sum(f.size for f in b.manifest.files)
    assert leftovers(tmp_path) == []
    (tmp_path / "plain").mkdir()  # permissions as any new directory, not mkdtemp's 0700
    assert target.stat().st_mode == (tmp_path / "plain").stat().st_mode
    with pytest.raises(BundleError, match="no file 'model.pte'"):
        b.file("model.pte")


def test_directory_method_file(tmp_path):
    # A Core ML .mlpackage is a directory: the method names it, the file list names its files.
    methods = [MethodSpec(METHOD_TEXT_DECODER, "decoder.mlpackage", inputs=[], outputs=[])]
    with BundleWriter(tmp_path / "tiny.edgekit") as w:
        w.path_for("decoder.mlpackage/Data/weights/weight.bin").write_bytes(b"w" * 10)
        w.path_for("decoder.mlpackage/Manifest.json").write_text("{}")
        b = w.finalize(make_manifest(format="coreml", backend="coreml", methods=methods, chat_template=None))
    assert load_bundle(b.path, verify="full").file("decoder.mlpackage").is_dir()
    assert [f.path for f in b.manifest.files] == ["decoder.mlpackage/Data/weights/weight.bin",
                                                  "decoder.mlpackage/Manifest.json"]


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_exception_mid_write_leaves_nothing(tmp_path, exc_type):
    target = tmp_path / "tiny.edgekit"
    with pytest.raises(exc_type):
        with BundleWriter(target) as w:
            w.path_for("decoder.onnx").write_bytes(b"partial")
            assert w.temp_dir.parent == tmp_path and w.temp_dir.name.startswith(".tiny.edgekit.tmp-")
            raise exc_type("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_finalize_never_called_leaves_nothing(tmp_path):
    with BundleWriter(tmp_path / "tiny.edgekit") as w:
        w.path_for("sub/dir/decoder.onnx").write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []


def test_finalize_checks_method_files(tmp_path):
    with pytest.raises(BundleError, match="method text_decoder is in decoder.onnx"):
        with BundleWriter(tmp_path / "tiny.edgekit") as w:
            w.path_for("embedding.onnx").write_bytes(b"x")
            w.write_text("chat_template.jinja", "")
            w.finalize(make_manifest())
    assert list(tmp_path.iterdir()) == []


def test_overwrite(tmp_path):
    target = write_bundle(tmp_path / "tiny.edgekit", payload=b"old")
    with pytest.raises(InputError, match="already exists"):
        write_bundle(target)
    write_bundle(target, overwrite=True, payload=b"new!")
    assert load_bundle(target, verify="full").file("decoder.onnx.data").read_bytes() == b"new!"
    assert leftovers(tmp_path) == []
    # overwrite=True never wipes a directory that is not a bundle.
    precious = tmp_path / "models"
    (precious / "keep.txt").parent.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not an edgekit bundle"):
        write_bundle(precious, overwrite=True)
    assert (precious / "keep.txt").read_text() == "mine"
    (precious / "manifest.json").write_text('{"name": "my web app", "start_url": "/"}')  # not ours
    with pytest.raises(InputError, match="not an edgekit bundle"):
        write_bundle(precious, overwrite=True)
    assert (precious / "keep.txt").read_text() == "mine"


def test_unwritable_output_place_is_an_input_error(tmp_path):
    """A file where the bundle's folder should be (or a read-only place): the output named is
    wrong (InputError), not an internal error, and nothing written."""
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="cannot write .*tiny.edgekit: .*notes.txt is not a folder"):
        with BundleWriter(tmp_path / "notes.txt" / "tiny.edgekit"):
            pass
    assert (tmp_path / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_disk_full_in_exporter_write(tmp_path, monkeypatch):
    def full_write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ExportError, match=r"disk full while writing decoder.onnx.data \(.* free on /.*\); "
                                          r"temporary files removed"):
        with BundleWriter(tmp_path / "tiny.edgekit") as w:
            w.path_for("decoder.onnx").write_bytes(b"graph")
            path = w.path_for("decoder.onnx.data")
            monkeypatch.setattr(Path, "write_bytes", full_write)
            try:
                path.write_bytes(b"weights")
            except OSError as exc:  # as a library would report it: errno plus the file name
                raise OSError(exc.errno, exc.strerror, str(path)) from None
    assert list(tmp_path.iterdir()) == []


def test_disk_full_in_add_file(tmp_path, monkeypatch):
    src = tmp_path / "tokenizer-src.json"
    src.write_text("{}")

    def full_copy(a, b, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bundle_mod.shutil, "copyfile", full_copy)
    with pytest.raises(ExportError, match="disk full while writing tokenizer.json"):
        with BundleWriter(tmp_path / "tiny.edgekit") as w:
            w.add_file(src, "tokenizer.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer-src.json"]


def test_progress_bar_for_big_files(tmp_path, monkeypatch):
    from edgekit import bundle_integrity

    monkeypatch.setattr(bundle_integrity, "_PROGRESS_MIN_BYTES", 0)
    monkeypatch.setenv("EDGEKIT_PROGRESS", "1")
    target = write_bundle(tmp_path / "tiny.edgekit")
    load_bundle(target, verify="full")


# --- loading -----------------------------------------------------------------------------


def test_load_missing_and_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="bundle not found"):
        load_bundle(tmp_path / "nope.edgekit")
    with pytest.raises(BundleError, match="has no manifest.json"):
        load_bundle(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(BundleError, match="is not a bundle directory"):
        load_bundle(tmp_path / "file.txt")
    with pytest.raises(InputError):
        load_bundle(tmp_path, verify="quick")  # type: ignore[arg-type]


def test_load_via_manifest_path(tmp_path):
    target = write_bundle(tmp_path / "tiny.edgekit")
    assert load_bundle(target / MANIFEST_FILE).path == target


def test_a_file_dropped_from_the_manifest_fails_full_verify(tmp_path):
    """Taking a file off the list must not take it out of the check (macOS's hidden
    .DS_Store is not the bundle's and is let be)."""
    target = write_bundle(tmp_path / "tiny.edgekit")
    (target / ".DS_Store").write_bytes(b"finder")
    load_bundle(target, verify="full")
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if f["path"] != "decoder.onnx.data"]
    (target / "manifest.json").write_text(json.dumps(manifest))
    (target / "decoder.onnx.data").write_bytes(b"anything")
    with pytest.raises(BundleError, match="decoder.onnx.data is not in the manifest"):
        load_bundle(target, verify="full")


def test_tampered_byte_fails_the_default_load(tmp_path):
    target = write_bundle(tmp_path / "tiny.edgekit")
    data = bytearray((target / "decoder.onnx.data").read_bytes())
    data[10] ^= 0xFF
    (target / "decoder.onnx.data").write_bytes(bytes(data))
    load_bundle(target, verify="sizes")  # asked for sizes only, it does not read contents
    corrupt = r"bundle file decoder.onnx.data is corrupt: sha256 [0-9a-f]{64} != manifest [0-9a-f]{64}"
    for verify in ("cached", "full"):
        with pytest.raises(BundleError, match=corrupt):
            load_bundle(target, verify=verify)
    with pytest.raises(BundleError, match="corrupt"):
        load_bundle(target)
    with pytest.raises(BundleError, match="corrupt"):
        verify_files(load_bundle(target, verify="none"), full=True)


def test_truncated_and_missing_files(tmp_path):
    target = write_bundle(tmp_path / "tiny.edgekit")
    with open(target / "decoder.onnx.data", "r+b") as fh:
        fh.truncate(7)
    with pytest.raises(BundleError, match="decoder.onnx.data is truncated or changed: 7 bytes != manifest 1500"):
        load_bundle(target)
    assert load_bundle(target, verify="none").manifest.device == "pi5"
    other = write_bundle(tmp_path / "other.edgekit")
    (other / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="bundle file tokenizer.json is missing"):
        load_bundle(other)


def test_bad_manifests(tmp_path):
    target = write_bundle(tmp_path / "tiny.edgekit")
    manifest = target / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "schema_version": 3}))
    with pytest.raises(BundleError, match="bundle manifest schema 3 is newer than this edgekit understands"):
        load_bundle(target)
    manifest.write_text('{"schema_version": 1,')
    with pytest.raises(BundleError, match="is not valid JSON"):
        load_bundle(target)
    manifest.write_text("[]")
    with pytest.raises(BundleError, match="must be an object"):
        load_bundle(target)


def test_leftover_temp_dir_is_not_a_bundle(tmp_path, monkeypatch):
    # A process killed between writing manifest.json and the rename leaves this behind.
    monkeypatch.setattr(bundle_mod.BundleWriter, "_install", lambda self, tmp: shutil.copytree(tmp, tmp_path / "kept"))
    write_bundle(tmp_path / "tiny.edgekit")
    leftover = tmp_path / ".tiny.edgekit.tmp-abc123"
    (tmp_path / "kept").rename(leftover)
    with pytest.raises(BundleError, match="unfinished bundle left by an interrupted export"):
        load_bundle(leftover)


# --- update_manifest and inspect ---------------------------------------------------------


def test_update_manifest(tmp_path):
    target = write_bundle(tmp_path / "tiny.edgekit")
    report = {"passed": True, "max_abs_error": {"text_decoder": 1.5e-5}}
    updated = update_manifest(target, verification=report)
    b = load_bundle(target, verify="full")  # file hashes are untouched
    assert b.manifest == updated and b.manifest.verification == report
    assert inspect_bundle(target)["verification"] == "passed"
    assert not (target / (MANIFEST_FILE + ".tmp")).exists()
    with pytest.raises(InputError, match="cannot update manifest field 'files'"):
        update_manifest(target, files=())
    with pytest.raises(InputError, match="not JSON-serializable"):
        update_manifest(target, verification={"x": object()})
    assert load_bundle(target).manifest.verification == report


def test_inspect_summary(tmp_path):
    target = write_bundle(tmp_path / "tiny.edgekit")
    s = inspect_bundle(target, verify="full")
    assert s["model"]["name"] == "tiny-e2b" and s["format"] == "onnx" and s["device"] == "pi5"
    assert s["methods"][1]["inputs"][0]["shape"] == [1, "seq_len", 64]
    assert s["total_size"] == sum(f["size"] for f in s["files"])
    assert s["files_checked"] == "full" and s["verification"] == "not verified"


def test_cli_inspect(tmp_path):
    target = write_bundle(tmp_path / "tiny.edgekit")
    result = run_cli("inspect", str(target), "--json", "--verify", "full", timeout=60)
    assert result.returncode == 0, result.stderr
    assert Manifest.from_dict(json.loads(result.stdout)) == load_bundle(target).manifest
    result = run_cli("inspect", str(target), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "tiny-e2b" in result.stdout and "decoder.onnx.data" in result.stdout
    assert_clean_failure(run_cli("inspect", str(tmp_path / "missing.edgekit"), "--json", timeout=60), code=6,
                         contains="bundle not found")


def test_bundle_reading_is_torch_free():
    code = ("import sys, edgekit.bundle, edgekit.manifest; "
            "bad = [m for m in ('torch', 'transformers', 'jsonschema') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(Path(bundle_mod.__file__).parent.parent)})
    assert result.returncode == 0, result.stderr
