//! The listening Unix socket of the API: created at a path (owner-only, stale file replaced, live
//! one refused) or taken over from an inherited file descriptor.

use std::fs::{self, DirBuilder, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::io::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use super::ApiServerError;
use crate::config::ApiSocketConfig;

pub(super) fn listen(config: &ApiSocketConfig) -> Result<UnixListener, ApiServerError> {
    match config {
        ApiSocketConfig::Path(path) => listen_at_path(Path::new(path)),
        ApiSocketConfig::Fd(fd) => take_inherited(*fd),
    }
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
    let private_dir = parent.join(format!(
        ".nvh-api-{}-{}",
        std::process::id(),
        NEXT_PRIVATE_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    DirBuilder::new()
        .mode(0o700)
        .create(&private_dir)
        .map_err(path_error("create a private directory beside it"))?;
    let bound_path = private_dir.join("s");
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
/// (a VMM that died) and may be replaced.
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
