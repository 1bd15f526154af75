"""A FUSE file system for tests: one flat directory in which files can be created, but every
write to them blocks until this process ends (as on a hung network mount).

Usage: /usr/bin/python3 stall_fs.py MOUNTPOINT   (Debian's python3-fusepy; runs in the foreground,
unmounted when killed). The tests use it to make a VMM's file I/O block for as long as they like.
"""

import errno
import stat
import sys
import threading
import time

try:  # Debian's python3-fusepy names the module fusepy; PyPI's fusepy names it fuse.
    from fusepy import FUSE, FuseOSError, Operations
except ImportError:
    from fuse import FUSE, FuseOSError, Operations


class StallingDirectory(Operations):
    def __init__(self):
        self.files = set()
        self.started = time.time()

    def _attributes(self, mode, links):
        return dict(st_mode=mode, st_nlink=links, st_size=0, st_uid=0, st_gid=0,
                    st_atime=self.started, st_mtime=self.started, st_ctime=self.started)

    def getattr(self, path, fh=None):
        if path == "/":
            return self._attributes(stat.S_IFDIR | 0o700, 2)
        if path in self.files:
            return self._attributes(stat.S_IFREG | 0o600, 1)
        raise FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        return [".", ".."] + sorted(name[1:] for name in self.files)

    def create(self, path, mode, fi=None):
        self.files.add(path)
        return 0

    def open(self, path, flags):
        return 0

    def write(self, path, data, offset, fh):
        threading.Event().wait()  # never set: the writer waits until we are gone

    def fsync(self, path, datasync, fh):
        threading.Event().wait()

    def truncate(self, path, length, fh=None):
        return 0

    def unlink(self, path):
        self.files.discard(path)


if __name__ == "__main__":
    FUSE(StallingDirectory(), sys.argv[1], foreground=True, nothreads=False)
