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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = stage(path, write)
    try:
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


def stage(path, write):
    """Call write(tmp) on a temporary file beside `path`; returns the finished, synced temporary's path.

    Nothing is under the final name yet: `publish` moves staged files into place together.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        publish_mode(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def publish(staged, overwrite):
    """Move staged files {final path: temporary path} into place, all or none.

    Files already under a final name are first renamed aside and restored if any later move fails (or is
    interrupted), so an overwrite either replaces every file or leaves every old one exactly as it was.
    overwrite False: FileExistsError if a final name exists (also one that appeared meanwhile).
    """
    moved, aside = [], []
    try:
        for final, tmp in staged.items():
            if os.path.lexists(final):
                if not overwrite:
                    raise FileExistsError(final)
                fd, backup = tempfile.mkstemp(prefix="." + os.path.basename(final) + ".", suffix=".old",
                                              dir=os.path.dirname(os.path.abspath(final)))
                os.close(fd)
                os.replace(final, backup)
                aside.append((final, backup))
            if overwrite:
                os.replace(tmp, final)
            else:
                try:
                    os.link(tmp, final)  # fails if the name appeared meanwhile
                except FileExistsError:
                    raise
                except OSError:  # filesystems without hard links
                    if os.path.lexists(final):
                        raise FileExistsError(final) from None
                    os.replace(tmp, final)
                if os.path.exists(tmp):
                    os.unlink(tmp)
            moved.append(final)
    except BaseException:
        for final in moved:
            os.unlink(final)
        for final, backup in aside:
            os.replace(backup, final)
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    for _, backup in aside:
        os.unlink(backup)
    return list(staged)
