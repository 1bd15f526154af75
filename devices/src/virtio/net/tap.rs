//! A TAP interface opened for virtio-net: `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (and
//! `IFF_MULTI_QUEUE` with more than one queue pair), one file descriptor per queue pair.
//! Packets cross it whole, each preceded by a 12-byte `virtio_net_hdr_v1` that carries the
//! checksum and segmentation offloads between the guest and the host stack.

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

/// Size of the header in front of every packet (virtio 1.x `virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

/// Kernel name template for a tap the VMM creates itself (no `tap=` given), as upstream.
pub const NEW_TAP_TEMPLATE: &str = "vmtap%d";

const IFNAMSIZ: usize = 16;

#[derive(Debug, Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    #[error("tap name {0:?} is empty, too long (15 bytes at most) or has a NUL byte")]
    BadName(String),
    #[error("cannot attach to tap {name:?} (TUNSETIFF): {source}; it does not exist and this process may not create it, or it is not a multi-queue tap while more than one queue pair was asked for")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("file descriptor {fd} is not a tap: {source}")]
    NotATap {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("file descriptor {fd} is a tun (layer 3) or lacks IFF_VNET_HDR (flags {flags:#x}); a tap opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR is needed")]
    WrongTapFlags { fd: RawFd, flags: u16 },
    #[error("tap {name}: {operation} failed: {source}")]
    Ioctl {
        name: String,
        operation: &'static str,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq`: the interface name and a 24-byte union (flags, an address, an MTU).
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn named(name: &str) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
            return Err(TapError::BadName(name.to_owned()));
        }
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        Ok(req)
    }

    fn flags(&self) -> u16 {
        u16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_flags(&mut self, flags: u16) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Puts an IPv4 `sockaddr_in` in the union (SIOCSIFADDR, SIOCSIFNETMASK).
    fn set_ipv4(&mut self, addr: std::net::Ipv4Addr) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&addr.octets());
    }

    /// Puts an Ethernet hardware address in the union (SIOCSIFHWADDR).
    fn set_mac(&mut self, mac: [u8; 6]) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
        self.data[2..8].copy_from_slice(&mac);
    }
}

/// Runs `request` on `fd` with `req`.
fn ioctl_ifreq(fd: RawFd, request: u64, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: every request used here reads or writes at most a `struct ifreq`, which `req` is
    // (40 bytes, the kernel's layout); `fd` is open for the duration of the call.
    let ret = unsafe { libc::ioctl(fd, request as _, req as *mut IfReq) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `request` on `fd` with an integer argument passed by value.
fn ioctl_value(fd: RawFd, request: u64, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the requests used here (TUNSETOFFLOAD) take their argument by value and touch no
    // memory of ours.
    let ret = unsafe { libc::ioctl(fd, request as _, value) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `request` on `fd` with a pointer to an `int` (TUNSETVNETHDRSZ).
fn ioctl_int_ptr(fd: RawFd, request: u64, value: &mut libc::c_int) -> io::Result<()> {
    // SAFETY: the request reads one `int` through the pointer, which is valid for the call.
    let ret = unsafe { libc::ioctl(fd, request as _, value as *mut libc::c_int) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An open tap: one descriptor per queue pair, all on the same interface.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<OwnedFd>,
}

const TAP_FLAGS: u16 = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;

impl Tap {
    /// Attaches to the tap `name` (the kernel creates it when it does not exist and this process
    /// has CAP_NET_ADMIN), or creates a new one from [`NEW_TAP_TEMPLATE`] when `name` is `None`.
    pub fn open(name: Option<&str>, queue_pairs: usize) -> Result<Self, TapError> {
        let requested = name.unwrap_or(NEW_TAP_TEMPLATE);
        let mut flags = TAP_FLAGS;
        if queue_pairs > 1 {
            flags |= libc::IFF_MULTI_QUEUE as u16;
        }
        let mut queues = Vec::with_capacity(queue_pairs.max(1));
        let mut actual = requested.to_owned();
        for _ in 0..queue_pairs.max(1) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(TapError::OpenTun)?;
            let mut req = IfReq::named(&actual)?;
            req.set_flags(flags);
            ioctl_ifreq(file.as_raw_fd(), libc::TUNSETIFF, &mut req).map_err(|source| {
                TapError::Attach {
                    name: requested.to_owned(),
                    source,
                }
            })?;
            // A template resolves to the kernel's choice; the next queues attach to that name.
            actual = req.name();
            queues.push(OwnedFd::from(file));
        }
        let tap = Tap {
            name: actual,
            queues,
        };
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// Takes over `fd`, a tap descriptor an orchestrator opened (`--net fd=`). It must be a tap
    /// with IFF_VNET_HDR and without packet information; it is made non-blocking.
    ///
    /// The caller hands over ownership: the descriptor is closed with the `Tap`.
    pub fn from_fd(fd: RawFd) -> Result<Self, TapError> {
        // SAFETY: F_GETFD only checks that `fd` is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::NotATap {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is open (checked above) and the caller gives us ownership of it: it is
        // closed when refused too.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        ioctl_ifreq(fd, libc::TUNGETIFF, &mut req)
            .map_err(|source| TapError::NotATap { fd, source })?;
        if req.flags() & TAP_FLAGS != TAP_FLAGS || req.flags() & libc::IFF_TUN as u16 != 0 {
            return Err(TapError::WrongTapFlags {
                fd,
                flags: req.flags(),
            });
        }
        // SAFETY: F_GETFL/F_SETFL on an open descriptor we own.
        unsafe {
            let status = libc::fcntl(fd, libc::F_GETFL);
            if status >= 0 {
                libc::fcntl(fd, libc::F_SETFL, status | libc::O_NONBLOCK);
            }
        }
        let tap = Tap {
            name: req.name(),
            queues: vec![owned],
        };
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// One descriptor per queue pair.
    pub fn queue_fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.queues.iter().map(AsRawFd::as_raw_fd)
    }

    pub fn queue_pairs(&self) -> usize {
        self.queues.len()
    }

    fn ioctl_error(&self, operation: &'static str) -> impl FnOnce(io::Error) -> TapError + '_ {
        move |source| TapError::Ioctl {
            name: self.name.clone(),
            operation,
            source,
        }
    }

    fn set_vnet_hdr_len(&self) -> Result<(), TapError> {
        for fd in self.queue_fds() {
            let mut len = VNET_HDR_LEN as libc::c_int;
            ioctl_int_ptr(fd, libc::TUNSETVNETHDRSZ, &mut len)
                .map_err(self.ioctl_error("TUNSETVNETHDRSZ"))?;
        }
        Ok(())
    }

    /// Tells the host stack which offloads the guest accepts on received packets (`TUN_F_*`).
    pub fn set_offload(&self, tun_flags: u32) -> Result<(), TapError> {
        for fd in self.queue_fds() {
            ioctl_value(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(tun_flags))
                .map_err(self.ioctl_error("TUNSETOFFLOAD"))?;
        }
        Ok(())
    }

    /// Runs an interface ioctl (`SIOCSIF*`) on the tap through an AF_INET socket.
    fn interface_ioctl(
        &self,
        operation: &'static str,
        request: u64,
        fill: impl FnOnce(&mut IfReq),
    ) -> Result<IfReq, TapError> {
        // SAFETY: a plain socket(2) call; the result is checked and owned below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(self.ioctl_error(operation)(io::Error::last_os_error()));
        }
        // SAFETY: `sock` was just opened and is owned here only.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        let mut req = IfReq::named(&self.name)?;
        fill(&mut req);
        ioctl_ifreq(sock.as_raw_fd(), request, &mut req).map_err(self.ioctl_error(operation))?;
        Ok(req)
    }

    /// Sets the host side's IPv4 address and netmask (upstream's `ip=`, `mask=`).
    pub fn set_ipv4(
        &self,
        ip: std::net::Ipv4Addr,
        mask: std::net::Ipv4Addr,
    ) -> Result<(), TapError> {
        self.interface_ioctl("SIOCSIFADDR", libc::SIOCSIFADDR, |r| r.set_ipv4(ip))?;
        self.interface_ioctl("SIOCSIFNETMASK", libc::SIOCSIFNETMASK, |r| r.set_ipv4(mask))?;
        Ok(())
    }

    /// Sets the host side's MAC address (upstream's `host_mac=`).
    pub fn set_mac(&self, mac: [u8; 6]) -> Result<(), TapError> {
        self.interface_ioctl("SIOCSIFHWADDR", libc::SIOCSIFHWADDR, |r| r.set_mac(mac))?;
        Ok(())
    }

    /// Sets the interface MTU.
    pub fn set_mtu(&self, mtu: u16) -> Result<(), TapError> {
        self.interface_ioctl("SIOCSIFMTU", libc::SIOCSIFMTU, |r| {
            r.data = [0; 24];
            r.data[..4].copy_from_slice(&i32::from(mtu).to_ne_bytes());
        })?;
        Ok(())
    }

    /// Brings the interface up.
    pub fn up(&self) -> Result<(), TapError> {
        let current = self.interface_ioctl("SIOCGIFFLAGS", libc::SIOCGIFFLAGS, |_| {})?;
        let flags = current.flags() | (libc::IFF_UP | libc::IFF_RUNNING) as u16;
        self.interface_ioctl("SIOCSIFFLAGS", libc::SIOCSIFFLAGS, |r| r.set_flags(flags))?;
        Ok(())
    }
}

/// Lets the device tests build a `struct ifreq` for a tun of their own.
#[cfg(test)]
pub(super) mod tests_support {
    pub fn ifreq(name: &str, flags: u16) -> [u8; 40] {
        let mut req = super::IfReq::named(name).unwrap();
        req.set_flags(flags);
        let mut bytes = [0u8; 40];
        bytes[..16].copy_from_slice(&req.name);
        bytes[16..].copy_from_slice(&req.data);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_longer_than_ifnamsiz_are_refused_before_any_syscall() {
        assert!(matches!(
            IfReq::named("a-very-long-tap-name"),
            Err(TapError::BadName(_))
        ));
        assert!(matches!(
            IfReq::named("bad\0name"),
            Err(TapError::BadName(_))
        ));
        assert_eq!(IfReq::named("tap0").unwrap().name(), "tap0");
    }

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
        let error = Tap::from_fd(fd).unwrap_err();
        assert!(matches!(error, TapError::NotATap { .. }), "{error}");
        assert!(matches!(
            Tap::from_fd(987_654),
            Err(TapError::NotATap { .. })
        ));
    }

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
