"""Write and read bundles: a directory `NAME.edgekit/` with manifest.json and its files.

    NAME.edgekit/
      manifest.json                     written last; sha256 + size of every other file
      model.pte | decoder.onnx + decoder.onnx.data + ... | *.mlpackage/...
      tokenizer.json  tokenizer_config.json  chat_template.jinja

Writing is atomic: files go to `.NAME.edgekit.tmp-HOST-PID-XXXX/` beside the target (same
filesystem), and one rename publishes the finished bundle, so an interrupted export
never leaves a directory that looks like a bundle (edgekit.scratch_dirs). Reading is
torch-free; by default it checks every byte against the manifest, hashing a file only
the first time it is opened in its current state (edgekit.bundle_integrity).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic_core import PydanticSerializationError

from edgekit.bundle_integrity import check_contents, check_layout, file_sha256, hash_progress, remember_written
from edgekit.errors import BundleError, ExportError, InputError
from edgekit.manifest import (
    MANIFEST_FILE, VERIFICATION_PASSED, FileEntry, Manifest, check_relative_path,
)
from edgekit.manifest_checks import check_against_files, check_manifest_values
from edgekit.overwrite_guard import check_replaceable
from edgekit.scratch_dirs import (
    OLD_MARK, RAW_MARK, TEMP_MARK, is_scratch_name, make_sibling_dir, sibling_path, sweep_stale,
)

VerifyLevel = Literal["cached", "full", "sizes", "none"]
VERIFY_LEVELS: tuple[str, ...] = get_args(VerifyLevel)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        """Path of a file (or a directory of files, e.g. an .mlpackage) the manifest lists."""
        if not _listed(name, {f.path for f in self.manifest.files}):
            raise BundleError(f"bundle {self.path.name} has no file {name!r}")
        return self.path / name


def _listed(name: str, names: set[str]) -> bool:
    # A Core ML .mlpackage is a directory: a method names it, the file list names its files.
    return name in names or any(n.startswith(name.rstrip("/") + "/") for n in names)


# --- writing -----------------------------------------------------------------------------


class BundleWriter:
    """Collects a bundle's files in a temporary directory and publishes it in one rename.

        with BundleWriter(out_dir / "gemma4-e2b-pi5.edgekit") as w:
            torch.onnx.save(..., w.path_for("decoder.onnx"))
            w.add_file(checkpoint / "tokenizer.json", "tokenizer.json")
            bundle = w.finalize(manifest)     # files, sizes and hashes are filled in here

    Leaving the block without finalize(), or by any exception (KeyboardInterrupt too),
    removes the temporary directory and leaves no target behind.
    """

    def __init__(self, target_dir: Path | str, *, overwrite: bool = False) -> None:
        self.target = Path(target_dir).absolute()
        self.overwrite = overwrite
        self._tmp: Path | None = None
        self._scratch: list[Path] = []
        self._bundle: Bundle | None = None

    def __enter__(self) -> BundleWriter:
        # Fail before an expensive export, not after it (checked again at the rename).
        check_target(self.target, overwrite=self.overwrite)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = make_sibling_dir(self.target, TEMP_MARK)
        except OSError as exc:  # a read-only or unwritable place, a file where a folder should be
            raise ExportError(f"cannot write a bundle in {self.target.parent}: {exc.strerror or exc}") from None
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        tmp, self._tmp = self._tmp, None
        for folder in [tmp, *self._scratch]:
            if folder is not None and folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
        self._scratch = []
        full = _disk_full_error(exc)
        if full is not None:
            name = _name_in(full.filename, tmp) if full.filename else "the bundle"
            raise ExportError(_disk_full_message(name, self.target.parent)) from exc

    @property
    def temp_dir(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("BundleWriter is used outside its `with` block or after finalize()")
        return self._tmp

    def scratch_dir(self) -> Path:
        """A folder beside the target for an exporter's intermediate files (on the bundle's
        file system, so a multi-GB graph does not fill /tmp); removed when the block exits."""
        self.temp_dir  # inside the block only
        folder = make_sibling_dir(self.target, RAW_MARK)
        self._scratch.append(folder)
        return folder

    def path_for(self, name: str) -> Path:
        """Where to write bundle file `name` (a relative path); its parent directories exist."""
        path = self.temp_dir / check_relative_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def add_file(self, src: Path | str, name: str) -> Path:
        """Copy `src` into the bundle as `name`."""
        src = Path(src)
        if not src.is_file():
            raise ExportError(f"cannot add {name} to the bundle: {src} is not a file")
        dst = self.path_for(name)
        try:
            shutil.copyfile(src, dst)
        except OSError as exc:
            exc.filename = exc.filename or str(dst)  # the disk-full message names the file
            raise
        return dst

    def write_text(self, name: str, text: str) -> Path:
        dst = self.path_for(name)
        try:
            dst.write_text(text, encoding="utf-8")
        except OSError as exc:
            exc.filename = exc.filename or str(dst)
            raise
        return dst

    def finalize(self, manifest: Manifest) -> Bundle:
        """Hash every file, write manifest.json last, fsync, and rename into place."""
        tmp = self.temp_dir
        names = _listing(tmp)
        _check_references(manifest, set(names), where="the bundle being written")
        entries = _hash_files(tmp, names)
        default_modes(tmp, names)
        final = manifest.replace(files=tuple(entries))
        _write_manifest(tmp / MANIFEST_FILE, final)
        _fsync_tree(tmp, names)
        self._install(tmp)
        self._tmp = None
        remember_written(self.target, entries)  # the first load need not hash what was just hashed
        self._bundle = Bundle(self.target, final)
        return self._bundle

    def _install(self, tmp: Path) -> None:
        if self.target.exists() or self.target.is_symlink():
            check_target(self.target, overwrite=self.overwrite)
        replace_directory(tmp, self.target)


def replace_directory(new: Path, target: Path) -> None:
    """Rename directory `new` to `target`. One already there is renamed aside, then `new` in,
    then the old one deleted: it is gone only once the new one is in place (and put back if
    that rename fails)."""
    if not (target.exists() or target.is_symlink()):
        os.rename(new, target)
        _fsync_dir(target.parent)
        return
    old = sibling_path(target, OLD_MARK)  # named for this process: a later run puts it back if this one dies
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _check_writable_place(target: Path) -> None:
    """The folder a bundle goes in can take new files: checked by making one there, since
    permissions do not tell (root may write anywhere but /proc or a read-only mount)."""
    import tempfile

    place = target.absolute().parent
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise InputError(f"cannot write {target}: {place} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".edgekit-probe-", dir=place))
    except OSError as exc:
        raise InputError(f"cannot write {target}: {place} does not take new files ({exc.strerror or exc})") from None


def check_target(target: Path, *, overwrite: bool) -> None:
    """Refuse a bundle path that exists, unless overwrite and it is an edgekit bundle holding
    only its listed files (or empty). First sweeps what a killed export to it left beside it."""
    target = Path(target)
    _check_writable_place(target)
    sweep_stale(target)
    if not (target.exists() or target.is_symlink()):
        return
    # The output the user named is in the way: an input error (exit 2), not a bad bundle.
    if not overwrite:
        raise InputError(f"{target} already exists (pass --overwrite to replace it)")
    if target.is_symlink() or not target.is_dir():
        raise InputError(f"refusing to overwrite {target}: it is not a bundle directory")
    # overwrite=True must not wipe a directory the user cares about (say, --out ~/models, or
    # a web app's folder, which has a manifest.json of its own), nor a file put in a bundle.
    check_replaceable(target, written=_written_files(target / MANIFEST_FILE), what="bundle", error=InputError,
                      also_ours=lambda rel: "/" not in rel and is_scratch_name(rel))


def _written_files(path: Path) -> set[str] | None:
    """The files an edgekit manifest.json lists, itself included; None if it is not one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not (isinstance(data, dict) and "edgekit_version" in data and "schema_version" in data):
        return None
    files = data.get("files")
    if not isinstance(files, list):
        return None
    listed = {f.get("path") for f in files if isinstance(f, dict)}
    return {p for p in listed if isinstance(p, str)} | {MANIFEST_FILE}


def _listing(root: Path) -> list[str]:
    """Relative "/" paths of every file under root, sorted; the manifest itself excluded."""
    names = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            path = Path(dirpath) / f
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() or not path.is_file():
                # Bundles are copied to phones and app assets, where links do not survive.
                raise BundleError(f"bundle file {rel} is a link or special file; write a regular file")
            if rel != MANIFEST_FILE:
                names.append(rel)
    return sorted(names)


def _write_manifest(path: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n"
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        exc.filename = exc.filename or str(path)
        raise


def _fsync_tree(root: Path, names: list[str]) -> None:
    """Flush file data and directory entries, so a power cut after the rename keeps the files."""
    for name in names:
        fd = os.open(root / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for dirpath, _dirs, _files in os.walk(root):
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # Windows cannot open a directory for fsync
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- disk full ---------------------------------------------------------------------------


def _disk_full_error(exc: BaseException | None) -> OSError | None:
    """The ENOSPC OSError in exc's chain (exporters may wrap it), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the disk, or its quota
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _name_in(filename: Any, tmp: Path | None) -> str:
    path = Path(os.fsdecode(filename))
    if tmp is not None:
        try:
            return path.relative_to(tmp).as_posix()
        except ValueError:
            pass
    return path.name


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    while not os.path.ismount(path) and path.parent != path:
        path = path.parent
    return path


def _disk_full_message(name: str, directory: Path) -> str:
    free = shutil.disk_usage(directory).free  # measured after cleanup: what a retry would have
    return (f"disk full while writing {name} ({format_bytes(free)} free on {_mount_point(directory)}); "
            "temporary files removed")


def format_bytes(n: int | float) -> str:
    """Decimal units, as disk tools and phones show sizes."""
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if abs(n) < 1000 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


# --- hashing -----------------------------------------------------------------------------


def _hash_files(root: Path, names: list[str]) -> list[FileEntry]:
    sizes = {name: (root / name).stat().st_size for name in names}
    with hash_progress(sum(sizes.values()), "Hashing bundle files (MiB)") as advance:
        return [FileEntry(path=name, size=sizes[name], sha256=file_sha256(root / name, advance)) for name in names]


# --- reading -----------------------------------------------------------------------------


def load_bundle(path: Path | str, *, verify: VerifyLevel = "cached") -> Bundle:
    """Read and check a bundle before anything uses it.

    Always: the manifest's values (against its schema, the runtime's needs, the machine),
    and the files' layout: no link, nothing but regular files, nothing the manifest does
    not list (hidden files such as .DS_Store are let be), so nothing is read from outside
    the bundle. verify: "cached" (the default) compares every file's sha256 with the
    manifest, hashing only files not hashed before in this state (edgekit.integrity_cache);
    "full" hashes every file; "sizes" checks sizes only; "none" reads no file but the
    manifest. Then the manifest must agree with the exported files it describes."""
    if verify not in VERIFY_LEVELS:
        raise InputError(f"verify must be one of {', '.join(VERIFY_LEVELS)}, got {verify!r}")
    root = Path(path)
    if root.name == MANIFEST_FILE and root.is_file():
        root = root.parent  # `edgekit inspect x.edgekit/manifest.json` means the bundle
    if is_scratch_name(root.name):
        raise BundleError(f"{root} is an unfinished bundle left by an interrupted export; delete it and export again")
    if not root.exists():
        raise BundleError(f"bundle not found: {root}")
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle directory (expected NAME.edgekit/ with {MANIFEST_FILE})")
    root = root.resolve()  # a link to the bundle is fine; links inside it are not
    manifest_path = root / MANIFEST_FILE
    if manifest_path.is_symlink():
        raise BundleError(f"bundle file {MANIFEST_FILE} is a link; a bundle holds its own files")
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not an edgekit bundle: it has no {MANIFEST_FILE}")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle manifest {manifest_path} is not valid JSON ({exc})") from None
    except RecursionError:
        raise BundleError(f"bundle manifest {manifest_path} is nested too deeply to be a manifest") from None
    except OSError as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc.strerror}") from None
    bundle = Bundle(root, Manifest.from_dict(data))
    check_manifest_values(bundle.manifest)
    _check_references(bundle.manifest, {f.path for f in bundle.manifest.files}, where="manifest.json's file list")
    stats = check_layout(root, bundle.manifest.files)
    if verify != "none":
        check_contents(root, bundle.manifest.files, stats, level=verify)
        check_against_files(root, bundle.manifest)
    return bundle


def _check_references(manifest: Manifest, names: set[str], *, where: str) -> None:
    """Every file a method or the chat template names must be in the bundle."""
    wanted = [(f"method {m.name}", m.file) for m in manifest.methods]
    if manifest.chat_template:
        wanted.append(("the chat template", manifest.chat_template))
    for what, name in wanted:
        if not _listed(name, names):
            raise BundleError(f"{what} is in {name}, which is not in {where}")


def verify_files(bundle: Bundle, *, full: bool = True) -> None:
    """Check the bundle's layout and every listed file's size; with full=True, hash every file."""
    stats = check_layout(bundle.path, bundle.manifest.files)
    check_contents(bundle.path, bundle.manifest.files, stats, level="full" if full else "sizes")


def verification_status(manifest: Manifest) -> str:
    """"passed", "failed", "recorded" (a report without a verdict) or "not verified"."""
    report = manifest.verification
    if report is None:
        return "not verified"
    passed = report.get(VERIFICATION_PASSED)
    return "recorded" if not isinstance(passed, bool) else ("passed" if passed else "failed")


def inspect_bundle(path: Path | str, *, verify: VerifyLevel = "cached") -> dict[str, Any]:
    """A JSON-ready summary for `edgekit inspect`."""
    bundle = load_bundle(path, verify=verify)
    m = bundle.manifest
    data = m.to_dict()
    return {
        "path": str(bundle.path),
        **{k: data[k] for k in ("schema_version", "edgekit_version", "created_at", "model", "device", "format",
                                "backend", "execution_providers", "recipe", "quant_schemes", "max_context",
                                "prefill_chunk", "methods")},
        "files": [{"path": f.path, "size": f.size} for f in m.files],
        "total_size": m.total_size,
        "files_checked": verify,
        "verification": verification_status(m),
    }


def update_manifest(bundle_path: Path | str, **changes: Any) -> Manifest:
    """Replace manifest fields (e.g. verification=report) in place, atomically.

    `files` and `schema_version` cannot change: they describe what the writer wrote.
    """
    fixed = {"files", "schema_version"}
    known = set(Manifest.model_fields)
    bad = sorted(set(changes) - (known - fixed))
    if bad:
        raise InputError(f"cannot update manifest field {bad[0]!r} (changeable: {', '.join(sorted(known - fixed))})")
    bundle = load_bundle(bundle_path, verify="none")
    updated = bundle.manifest.replace(**changes)
    try:
        check_manifest_values(Manifest.from_dict(json.loads(json.dumps(updated.to_dict()))))  # a reader must load it
    except (TypeError, PydanticSerializationError) as exc:
        raise InputError(f"manifest update is not JSON-serializable: {exc}") from None
    target = bundle.path / MANIFEST_FILE
    tmp = sibling_path(target, TEMP_MARK)  # hidden, and named for this process if it is killed
    try:
        _write_manifest(tmp, updated)
        os.replace(tmp, target)
        _fsync_dir(bundle.path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _disk_full_error(exc) is not None:
            raise ExportError(_disk_full_message(MANIFEST_FILE, bundle.path)) from exc
        raise
    return updated


def default_modes(root: Path, names: list[str]) -> None:
    """Every file readable as a newly created one is (0o666 less the umask): tools such as
    onnxruntime's quantizer write through private temporary files (0o600), which would
    leave a bundle other users, or an app's service account, cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        os.chmod(root / name, 0o666 & ~umask)
