"""Per-stream state on disk: checkpoints, evicted streams and named snapshots.

Layout under the state directory:
    streams/<quoted stream id>.pt                    the stream's latest checkpoint
    streams/<quoted stream id>.pt.prev               the one before it (fallback if the latest is refused)
    snapshots/<quoted stream id>/<name>.pt           named snapshots

A record is a dict: {"stream_id", "policy", "hyperparameters", "adapter" (the adapter's
state_dict, generator state included; None for a frozen stream), "step", "counters"}.

A state file holds data, never code (no pickle; nothing here calls pickle or torch.load):

    MAGIC | mode (1 byte) | key id (8 bytes) | digest (32 bytes) | body
    body   = one safetensors blob (https://github.com/huggingface/safetensors): the record's
             tensors under generated keys "t0", "t1", ... and a str->str metadata dict with
             "format" (FORMAT), "stream_id", "model" (the model's weights fingerprint) and
             "record": the rest of the record as a JSON skeleton in which each tensor is
             {"tensor": "t<i>"} and types JSON lacks are tagged, so they come back exactly:
             {"float": "nan" | "inf" | "-inf"}, {"tuple": [...]}, {"list": [...]},
             {"dict": [[key, value], ...]} and {"odict": [...], "meta": ...} (an OrderedDict and
             its `_metadata`, as nn.Module.state_dict returns them); keys are str or int.
    mode   = b"K": digest = HMAC-SHA256 under the server's state key (--state-key-file or
             $TTA_STATE_KEY), key id = the first 8 bytes of HMAC(key, KEY_ID_LABEL) (which key
             signed it, to say so in the log; it reveals nothing of the key)
             b"S": digest = SHA-256, key id = zeros: integrity against damage only, so without
             a key the state directory itself must be trusted (docs/OPERATIONS.md)
    The digest covers MAGIC, mode, key id and body; the body names the stream and the model.

A file is refused (CorruptCheckpoint, with `reason` for tta_state_files_rejected_total) when it
does not verify (`checksum`: damaged; `signature`: altered, signed with another key, signed
while this server has no key or unsigned while it has one), is malformed (`format`: anything
but the types above, or beyond the size and depth bounds), belongs to another stream
(`other_stream`) or another model (`other_model`), or is in the old pickle format (`legacy`,
MAGIC "TTA-CKPT-1": never unpickled). Writes are atomic: temporary file, fsync, rename, fsync of
the directory; the previous checkpoint is kept as a hard link first. A crash at any moment
(kill -9, power loss) therefore leaves the stream's last completed checkpoint readable.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable
from urllib.parse import quote, unquote

from runtime.state_format import FORMAT, Refused, Unpacker, pack_body, read_body, strict_json

log = logging.getLogger("tta.checkpoints")

SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAGIC = b"TTA-CKPT-2\n"
LEGACY_MAGIC = b"TTA-CKPT-1\n"  # MAGIC + SHA-256 + a torch pickle: refused, never loaded
KEYED, PLAIN = b"K", b"S"
KEY_ID_BYTES = 8
DIGEST_BYTES = 32
HEADER_BYTES = len(MAGIC) + 1 + KEY_ID_BYTES + DIGEST_BYTES
KEY_ID_LABEL = b"tta-runtime state key id"
STATE_KEY_ENV = "TTA_STATE_KEY"  # server-side only: the state key when --state-key-file is not given
MIN_KEY_BYTES = 16
TMP_SUFFIX = ".tmp"
MAX_FILE_NAME = 240  # bytes; file systems allow 255 for a name, the rest is for suffixes
PREV_SUFFIX = ".prev"
# bounds of what a file may describe (far above any adapter's state)
REASONS = ("checksum", "signature", "format", "other_stream", "other_model", "legacy")


class CorruptCheckpoint(Exception):
    """A state file that is refused: damaged, not verified under this server's key, of another
    stream or model, of the old format, or malformed. str(e) names the file only relative to the
    state dir (it reaches clients in DATA_LOSS details); `path` is the full path, for the server
    log; `reason` labels tta_state_files_rejected_total (one of REASONS)."""

    def __init__(self, name: str, why: str, reason: str, path: Path | None = None):
        super().__init__(f"{name}: {why}")
        self.name, self.why, self.reason, self.path = name, why, reason, path


def file_name(stream_id: str) -> str:
    name = quote(stream_id, safe="") or "%00"
    # a leading dot would hide the file (and '.'/'..' name directories): encode it like any other byte
    return "%2E" + name[1:] if name.startswith(".") else name


def key_id(key: bytes) -> bytes:
    return hmac.new(key, KEY_ID_LABEL, hashlib.sha256).digest()[:KEY_ID_BYTES]


def load_key(path: str | None, env: str = STATE_KEY_ENV) -> bytes | None:
    """The state key: the file's content (stripped), else the environment variable, else None.
    ValueError (with what to do) when it is empty or shorter than MIN_KEY_BYTES."""
    if path:
        with open(path, "rb") as f:
            key, where = f.read().strip(), f"--state-key-file {path}"
    elif env in os.environ:
        key, where = os.environ[env].strip().encode(), f"${env}"
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the state key from {where} is {'empty' if not key else f'{len(key)} bytes'}; it needs "
                         f"at least {MIN_KEY_BYTES} (e.g. python -c 'import secrets; print(secrets.token_hex(32))')")
    return key


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(mode: bytes, kid: bytes, body: bytes, key: bytes | None) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256) if mode == KEYED else hashlib.sha256()
    for part in (MAGIC, mode, kid, body):
        h.update(part)
    return h.digest()


def encode(record: dict, stream_id: str, key: bytes | None = None, fingerprint: str = "") -> bytes:
    """A state file's bytes: the record bound to its stream and model, signed with `key` (an
    HMAC) or, without one, checksummed."""
    body = pack_body(record, stream_id, fingerprint)
    mode, kid = (KEYED, key_id(key)) if key is not None else (PLAIN, bytes(KEY_ID_BYTES))
    return MAGIC + mode + kid + _digest(mode, kid, body, key) + body


def decode(data: bytes, stream_id: str, key: bytes | None = None, fingerprint: str = "",
           name: str = "state file") -> dict:
    """The record of a state file of `stream_id` written for the model `fingerprint`, verified
    under `key` (or its checksum without one); CorruptCheckpoint otherwise. Never runs code."""
    try:
        return _decode(data, stream_id, key, fingerprint)
    except Refused as e:
        raise CorruptCheckpoint(name, e.why, e.reason) from None


def _decode(data: bytes, stream_id: str, key: bytes | None, fingerprint: str) -> dict:
    if data.startswith(LEGACY_MAGIC):
        raise Refused("legacy", "written by an older tta-runtime in a format that can carry code (a pickle), so it "
                                 "is refused and never loaded; start the stream over (tta ctl set-policy) or delete "
                                 "it (tta ctl delete) and remove any other files in the old format")
    if not data.startswith(MAGIC):
        version = data.startswith(MAGIC[:-2])
        raise Refused("format", "an unknown version of the tta-runtime state format" if version
                       else "not a tta-runtime state file (bad header)")
    if len(data) < HEADER_BYTES:
        raise Refused("signature" if key is not None else "checksum", f"cut short ({len(data)} bytes)")
    at = len(MAGIC)
    mode, kid = data[at:at + 1], data[at + 1:at + 1 + KEY_ID_BYTES]
    digest, body = data[at + 1 + KEY_ID_BYTES:HEADER_BYTES], data[HEADER_BYTES:]
    if mode not in (KEYED, PLAIN):
        raise Refused("format", "unknown signature mode")
    if mode == KEYED and key is None:
        raise Refused("signature", f"signed with a state key (key id {kid.hex()}) but this server has no "
                                    f"--state-key-file / ${STATE_KEY_ENV}: start it with the key that signed it")
    if mode == PLAIN and key is not None:
        raise Refused("signature", "written without a state key, and this server, started with a state key, "
                                    "accepts only files signed with it")
    if mode == KEYED and not hmac.compare_digest(kid, key_id(key)):
        raise Refused("signature", f"signed with another state key (key id {kid.hex()}; this server's key id is "
                                    f"{key_id(key).hex()})")
    if not hmac.compare_digest(digest, _digest(mode, kid, body, key)):
        if mode == KEYED:
            raise Refused("signature", "its signature does not verify under this server's state key (altered or "
                                        "damaged)")
        raise Refused("checksum", f"checksum mismatch ({len(body)} body bytes): damaged")
    metadata, tensors = read_body(body)
    if metadata["format"] != FORMAT:
        raise Refused("format", f"record format {metadata['format'][:40]!r}, expected {FORMAT!r}")
    if metadata["stream_id"] != stream_id:
        raise Refused("other_stream", f"it holds the state of another stream ({metadata['stream_id'][:80]!r})")
    if metadata["model"] != fingerprint:
        raise Refused("other_model", f"it was written for another model (weights fingerprint "
                                      f"{metadata['model'][:12] or 'none'}; this server's model is "
                                      f"{fingerprint[:12] or 'none'})")
    try:
        skeleton = strict_json(metadata["record"])
    except (ValueError, RecursionError) as e:
        raise Refused("format", f"the record is not valid JSON ({type(e).__name__})") from None
    unpack = Unpacker(tensors)
    record = unpack(skeleton)
    if type(record) is not dict:
        raise Refused("format", "the record is not a dict")
    if unpack.used != set(tensors):
        raise Refused("format", f"{len(set(tensors) - unpack.used)} tensors no part of the record refers to")
    return record


class StateStore:
    """The state dir of one server: `key` signs and verifies every file (None: SHA-256 only);
    `model_fingerprint` (LoadedModel.fingerprint) binds every file to the model; `on_reject(reason)`
    is called for every refused file (the engine counts tta_state_files_rejected_total)."""

    def __init__(self, root: str | os.PathLike, key: bytes | None = None, model_fingerprint: str = "",
                 on_reject: Callable[[str], None] | None = None):
        if key is not None and len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a state key needs at least {MIN_KEY_BYTES} bytes")
        self.root = Path(root)
        self.key, self.model_fingerprint, self.on_reject = key, model_fingerprint, on_reject
        (self.root / "streams").mkdir(parents=True, exist_ok=True)
        (self.root / "snapshots").mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self) -> None:
        """Temporary files are what a crash mid-write leaves behind; they were never a checkpoint."""
        for tmp in self.root.rglob(f".*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)

    def _name(self, path: Path) -> str:
        """The file as clients may hear of it: relative to the state dir."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.name

    # --- atomic file io -------------------------------------------------------------------
    def _write(self, path: Path, stream_id: str, record: dict, keep_previous: bool = False) -> None:
        data = encode(record, stream_id, self.key, self.model_fingerprint)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{os.getpid()}{TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if keep_previous and path.exists():
                prev = path.with_name(path.name + PREV_SUFFIX)
                prev.unlink(missing_ok=True)
                os.link(path, prev)  # the latest stays in place until the rename below
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _read(self, path: Path, stream_id: str) -> dict:
        data = path.read_bytes()
        try:
            return decode(data, stream_id, self.key, self.model_fingerprint, self._name(path))
        except CorruptCheckpoint as e:
            e.path = path
            log.error("refused state file %s (%s): %s", path, e.reason, e.why)
            if self.on_reject is not None:
                self.on_reject(e.reason)
            raise

    def _read_with_fallback(self, path: Path, stream_id: str) -> dict:
        """The latest checkpoint, or the previous one when the latest is refused (which is then
        set aside as *.corrupt-<time> for inspection, never loaded)."""
        try:
            return self._read(path, stream_id)
        except CorruptCheckpoint as e:
            prev = path.with_name(path.name + PREV_SUFFIX)
            if e.reason not in ("checksum", "format"):
                # intact but not ours (another key, stream or model, the old format): left where it
                # is, so that a replica started with the wrong key cannot push the right ones back
                if not prev.exists():
                    raise
                log.error("refused %s; trying the previous checkpoint", path)
                return self._read(prev, stream_id)
            kept = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            os.replace(path, kept)
            if not prev.exists():
                log.error("moved %s to %s; no previous checkpoint exists", path, kept.name)
                raise
            log.error("moved %s to %s; trying the previous checkpoint", path, kept.name)
            os.link(prev, path)
            return self._read(path, stream_id)

    # --- stream state -------------------------------------------------------------------
    def stream_path(self, stream_id: str) -> Path:
        return self.root / "streams" / f"{file_name(stream_id)}.pt"

    def save_stream(self, stream_id: str, record: dict) -> None:
        self._write(self.stream_path(stream_id), stream_id, record, keep_previous=True)

    def load_stream(self, stream_id: str) -> dict:
        return self._read_with_fallback(self.stream_path(stream_id), stream_id)

    def delete_stream(self, stream_id: str) -> None:
        path = self.stream_path(stream_id)
        folder = self.root / "snapshots" / file_name(stream_id)
        if folder.is_dir():
            shutil.rmtree(folder)
        path.with_name(path.name + PREV_SUFFIX).unlink(missing_ok=True)
        path.unlink(missing_ok=True)  # last: while it exists, a restart still knows the stream
        _fsync_dir(path.parent)  # durable: a deleted stream does not come back after a crash

    def saved_streams(self) -> list[str]:
        return sorted(unquote(p.stem) for p in (self.root / "streams").glob("*.pt") if not p.name.startswith("."))

    # --- snapshots ------------------------------------------------------------------------
    def snapshot_path(self, stream_id: str, name: str) -> Path:
        return self.root / "snapshots" / file_name(stream_id) / f"{name}.pt"

    def save_snapshot(self, stream_id: str, name: str, record: dict) -> None:
        self._write(self.snapshot_path(stream_id, name), stream_id, record)

    def load_snapshot(self, stream_id: str, name: str) -> dict:
        return self._read(self.snapshot_path(stream_id, name), stream_id)

    def snapshots(self, stream_id: str) -> list[str]:
        """Names, oldest first."""
        folder = self.root / "snapshots" / file_name(stream_id)
        if not folder.is_dir():
            return []
        files = [p for p in folder.glob("*.pt") if not p.name.startswith(".")]
        return [p.stem for p in sorted(files, key=lambda p: p.stat().st_mtime_ns)]
