//! The listening Unix socket of the API: created at a path (owner-only, stale file replaced, live
//! one refused) or taken over from an inherited file descriptor.
//!
//! Who owns a path is decided by an exclusive `flock` on `<path>.lock`, taken before the socket
//! file is looked at and held for the life of the process: two VMMs started on one path at once
//! cannot both decide the socket is stale and replace each other's (checking by connecting and
//! then renaming over the path is a race). The lock file stays behind on exit: removing it would
//! let a third VMM lock a fresh file while a second still holds the old one.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::ApiServerError;
use crate::config::ApiSocketConfig;

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes with its final NUL).
pub(super) const MAX_SOCKET_PATH: usize = 107;

/// A listening socket and, for one created at a path, the lock that makes the path ours. The
/// lock must live as long as the socket is served.
pub(super) struct ApiListener {
    pub listener: UnixListener,
    pub _path_lock: Option<File>,
}

pub(super) fn listen(config: &ApiSocketConfig) -> Result<ApiListener, ApiServerError> {
    match config {
        ApiSocketConfig::Path(path) => {
            let path = Path::new(path);
            check_length(path)?;
            let lock = lock_path(path)?;
            Ok(ApiListener {
                listener: listen_at_path(path)?,
                _path_lock: Some(lock),
            })
        }
        ApiSocketConfig::Fd(fd) => Ok(ApiListener {
            listener: take_inherited(*fd)?,
            _path_lock: None,
        }),
    }
}

/// A client connects by the path as given; one longer than a socket address holds could be
/// created (we bind elsewhere and rename) but never reached.
fn check_length(path: &Path) -> Result<(), ApiServerError> {
    let length = path.as_os_str().len();
    if length > MAX_SOCKET_PATH {
        return Err(ApiServerError::PathTooLong {
            path: path.display().to_string(),
            length,
        });
    }
    Ok(())
}

/// Takes the exclusive lock on `<path>.lock` (created 0600 if missing), without waiting.
fn lock_path(path: &Path) -> Result<File, ApiServerError> {
    let shown = path.display().to_string();
    let mut lock_name = path.as_os_str().to_owned();
    lock_name.push(".lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&lock_name)
        .map_err(|source| ApiServerError::SocketPath {
            path: shown.clone(),
            action: "open its lock file",
            source,
        })?;
    // SAFETY: `flock` on an fd this function owns; it only changes the lock state of the file.
    let result = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if result == 0 {
        return Ok(lock);
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(ApiServerError::SocketInUse { path: shown });
    }
    Err(ApiServerError::SocketPath {
        path: shown,
        action: "lock its lock file",
        source: error,
    })
}

/// Binds the socket in a private (0700) directory beside `path`, makes it 0600 and renames it
/// into place. Nobody else can connect during the window between bind and chmod, and the rename
/// replaces a stale socket file atomically.
fn listen_at_path(path: &Path) -> Result<UnixListener, ApiServerError> {
    let shown = path.display().to_string();
    let path_error = |action: &'static str| {
        let shown = shown.clone();
        move |source: io::Error| ApiServerError::SocketPath {
            path: shown,
            action,
            source,
        }
    };
    check_existing(path)?;
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Unique per process and per call: two servers of one process (tests) may start together.
    static NEXT_PRIVATE_DIR: AtomicU32 = AtomicU32::new(0);
    // Short: the socket is bound here, and this path must fit a socket address too.
    let private_dir = parent.join(format!(
        ".nvh{:x}-{}",
        std::process::id(),
        NEXT_PRIVATE_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    DirBuilder::new()
        .mode(0o700)
        .create(&private_dir)
        .map_err(path_error("create a private directory beside it"))?;
    let bound_path = private_dir.join("s");
    if bound_path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ApiServerError::PathTooLong {
            path: bound_path.display().to_string(),
            length: bound_path.as_os_str().len(),
        });
    }
    let result = (|| {
        let listener = UnixListener::bind(&bound_path).map_err(path_error("bind"))?;
        fs::set_permissions(&bound_path, Permissions::from_mode(0o600))
            .map_err(path_error("make it owner-only"))?;
        fs::rename(&bound_path, path).map_err(path_error("move it into place"))?;
        Ok(listener)
    })();
    // Best effort: the directory is empty after a successful rename; on failure remove both.
    let _ = fs::remove_file(&bound_path);
    let _ = fs::remove_dir(&private_dir);
    result
}

/// Refuses a live socket or a non-socket file at `path`; a socket nobody listens on is stale
/// (a VMM that died) and may be replaced. Under the path's lock this only matters for a socket
/// served by a process that does not take the lock (another program, an older build).
fn check_existing(path: &Path) -> Result<(), ApiServerError> {
    let shown = path.display().to_string();
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiServerError::SocketPath {
                path: shown,
                action: "inspect the existing file",
                source,
            })
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(ApiServerError::NotASocket { path: shown });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiServerError::SocketInUse { path: shown }),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        Err(source) => Err(ApiServerError::SocketPath {
            path: shown,
            action: "probe the existing socket",
            source,
        }),
    }
}

/// Takes over an inherited listening socket after checking that it is one: a wrong fd number
/// must give a clear error, not a server silently reading from some other file.
fn take_inherited(fd: RawFd) -> Result<UnixListener, ApiServerError> {
    let refuse = |reason: String| ApiServerError::InheritedFd { fd, reason };
    if fd < 0 {
        return Err(refuse("not a file descriptor".into()));
    }
    let domain = socket_option(fd, libc::SO_DOMAIN).map_err(|error| refuse(error.to_string()))?;
    let kind = socket_option(fd, libc::SO_TYPE).map_err(|error| refuse(error.to_string()))?;
    let listening =
        socket_option(fd, libc::SO_ACCEPTCONN).map_err(|error| refuse(error.to_string()))?;
    if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM {
        return Err(refuse("not a Unix stream socket".into()));
    }
    if listening == 0 {
        return Err(refuse("the socket is not listening".into()));
    }
    // SAFETY: `fcntl(F_SETFD)` on an fd we just checked is an open socket; it only sets the
    // close-on-exec flag so that child processes (disk helpers, ...) do not inherit the API.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the fd is an open, listening Unix stream socket (checked above) that the parent
    // handed to this process for the API; `--api-socket fd=N` transfers its ownership here, and
    // nothing else in the VMM uses it.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

fn socket_option(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `length` are valid for writes of an int and its size for the duration
    // of the call; the kernel writes at most `length` bytes. A bad fd gives EBADF/ENOTSOCK.
    let result = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut length,
        )
    };
    if result == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}
