"""Writing files whole or not at all."""
import os
import tempfile


def publish_mode(tmp):
    """Give a temporary file (mkstemp makes it 0600) the mode a plain open() would have: 0666 minus the umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)


def atomic_write(path, write, overwrite=True):
    """Call write(tmp_path) on a temporary file beside `path`, then move it into place.

    An interruption or error leaves the old file (or none) and no partial file under the final name.
    overwrite False: raise FileExistsError if `path` exists, also if it appeared while writing (never clobbers).
    """
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        publish_mode(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the name appeared meanwhile
            except FileExistsError:  # an OSError too: keep it out of the fallback below
                raise
            except OSError:  # filesystems without hard links
                if os.path.exists(path):
                    raise FileExistsError(path) from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path, text):
    """Atomically write a text file (UTF-8)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)
