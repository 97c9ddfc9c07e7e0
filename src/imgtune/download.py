"""Downloads of public datasets: resumable, checksummed, atomic, and quick to say so when there is no network.

Archives of a gigabyte break on real connections, so the bytes go to `<file>.part` and a rerun continues with
an HTTP Range request; only a file whose MD5 matches the published one takes the final name. Offline the first
connection fails within seconds and the message says how to get the file another way (`--source`).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Collection
from pathlib import Path

from imgtune.errors import UserError
from imgtune.progress import Progress, SilentProgress

log = logging.getLogger(__name__)
MIB = 1 << 20


class DownloadError(UserError, OSError):
    """A download failed; the message names the URL, what went wrong and how to go on."""


def cache_root() -> Path:
    """imgtune's cache of downloaded data: $IMGTUNE_CACHE (default ~/.cache/imgtune)."""
    return Path(os.environ.get("IMGTUNE_CACHE", Path.home() / ".cache" / "imgtune"))


def cache_dir() -> Path:
    """Where downloads are kept between runs: $IMGTUNE_CACHE/downloads (default ~/.cache/imgtune/downloads)."""
    return cache_root() / "downloads"


def file_md5(path: Path, start: hashlib._Hash | None = None) -> str:
    digest = start or hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse | None:
    """The response from `offset` on, or None when the server says the partial file is already complete."""
    headers = {"User-Agent": "imgtune"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left past what we have
            return None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"cannot reach {url} ({reason}). This needs internet: download the file elsewhere and pass it with "
            f"--source, or point --mirror at a server that has it"
        ) from None


def download(
    url: str,
    dest: Path,
    md5: Collection[str] = (),
    progress: Progress | None = None,
    timeout: float = 30.0,
) -> Path:
    """`url` -> `dest`, resuming `dest.part` where an earlier try stopped. With `md5` (any of several published
    sums), a finished file that does not match is removed and reported, never kept under the final name."""
    dest = Path(dest)
    if dest.is_file() and (not md5 or file_md5(dest) in md5):
        log.info("%s: already downloaded", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    digest = hashlib.md5()
    response = _open(url, have, timeout)
    if response is not None:
        with response:
            if have and response.status != 206:  # the server ignored the Range header: start again
                log.info("%s: the server cannot resume; downloading from the start", url)
                have = 0
            if have:
                log.info("%s: resuming after %.1f MiB", url, have / MIB)
                file_md5(part, digest)
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            have = _receive(response, part, have, total, digest, url, progress or SilentProgress())
    else:
        file_md5(part, digest)
    got = digest.hexdigest()
    if md5 and got not in md5:
        part.unlink()
        raise DownloadError(
            f"{url}: checksum mismatch (md5 {got}, published {' or '.join(sorted(md5))}); "
            f"the damaged file was removed, run the command again"
        )
    os.replace(part, dest)
    log.info("%s: %.1f MiB, md5 %s", dest, have / MIB, got)
    return dest


def _receive(
    response: http.client.HTTPResponse,
    part: Path,
    have: int,
    total: int | None,
    digest: hashlib._Hash,
    url: str,
    progress: Progress,
) -> int:
    """Append the body to `part`; a cut connection keeps what arrived (the next run resumes from it)."""
    task = progress.task(f"download {part.name[: -len('.part')]} (MiB)", max(1, -(-(total or 0) // MIB)))
    shown = have // MIB
    task.advance(shown)
    try:
        with open(part, "ab" if have else "wb") as f:
            while chunk := response.read(MIB):
                f.write(chunk)
                digest.update(chunk)
                have += len(chunk)
                task.advance(have // MIB - shown)
                shown = have // MIB
            f.flush()
            os.fsync(f.fileno())
    except (http.client.IncompleteRead, ConnectionError, TimeoutError) as e:  # not disk errors: those say so
        raise DownloadError(
            f"{url}: the connection broke after {have / MIB:.1f} MiB ({type(e).__name__}); "
            f"run the command again to resume from there"
        ) from None
    finally:
        task.close()
    if total is not None and have < total:
        raise DownloadError(f"{url}: {have} of {total} bytes arrived; run the command again to resume from there")
    return have
