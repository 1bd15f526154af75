//! Network namespaces for the virtio-net tests and nv-bench's network measurements: the VMM is
//! spawned from a thread inside one, so the taps and addresses it makes exist only there and
//! never touch the host's network. Creating one needs root (`ip netns add`); a machine that
//! cannot fails loudly.

use std::ffi::CString;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;

/// The netkv network in a namespace: a persistent tap (it outlives the VMM, as an orchestrator's
/// tap does, so the host's address and route stay while the VMM is gone), the host's address
/// on it, and the guest's address and UDP port.
pub const KV_TAP: &str = "nvkv0";
pub const KV_HOST_CIDR: &str = "10.77.0.1/24";
pub const KV_GUEST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 2), 7777);
/// The MAC the netkv VM's `--net` gives the guest.
pub const KV_GUEST_MAC: &str = "02:00:00:00:77:02";
/// A second tap for host-only baselines ([`Netns::add_baseline_tap`]): its MAC and address,
/// and the made-up sender the frames written into it come from.
pub const BASELINE_TAP: &str = "nvkv1";
pub const BASELINE_TAP_MAC: [u8; 6] = [2, 0, 0, 0, 0x78, 1];
pub const BASELINE_HOST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 78, 0, 1), 7778);
pub const BASELINE_SENDER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 78, 0, 2), 7777);
pub const BASELINE_SENDER_MAC: [u8; 6] = [2, 0, 0, 0, 0x78, 2];

/// The arguments that boot the netkv test guest at [`KV_GUEST`] in 64 MiB of RAM, with
/// `parameters` (e.g. `hotplug=1`) after its address on its command line; its network device
/// is the caller's to add.
pub fn netkv_guest_arguments(parameters: &str) -> Vec<String> {
    let address = format!("ip={} port={}", KV_GUEST.ip(), KV_GUEST.port());
    crate::harness::guest_arguments("netkv", &format!("{address} {parameters}"), "64M")
}

/// A network namespace: created on `new`, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// `nvnet-<label>-<pid>`; panics when the namespace cannot be made (needs root, iproute2).
    pub fn new(label: &str) -> Self {
        Self::try_new(label).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `new`, with the reason as an error when the namespace cannot be made.
    pub fn try_new(label: &str) -> Result<Self, String> {
        let name = format!("nvnet-{label}-{}", std::process::id());
        run_ip(&["netns", "add", &name])
            .map_err(|e| format!("{e} (root, iproute2 and network namespaces are needed)"))?;
        Ok(Netns { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `body` on a thread that entered the namespace: what it spawns lives there.
    pub fn run<T: Send + 'static>(&self, body: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            set_network_namespace(&ns);
            body()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Moves the calling thread into the namespace until the guard is dropped (then back into
    /// the namespace it was in): processes it spawns and sockets it opens meanwhile live there.
    pub fn enter(&self) -> std::io::Result<Entered> {
        let own = File::open("/proc/thread-self/ns/net")?;
        let ns = File::open(self.path())?;
        set_network_namespace(&ns);
        Ok(Entered { previous: own })
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// `ip -n NS link show NAME`'s output, or `None` when there is no such link.
    pub fn link(&self, name: &str) -> Option<String> {
        let out = Command::new("ip")
            .args(["-n", &self.name, "link", "show", name])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ip -n NS arguments...`; the error names the command and says why it failed.
    pub fn ip(&self, arguments: &[&str]) -> Result<(), String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(arguments);
        run_ip(&all)
    }

    /// Creates the netkv tap ([`KV_TAP`], vnet header, one queue pair, persistent) with the
    /// host's address [`KV_HOST_CIDR`], up.
    pub fn add_kv_tap(&self) -> Result<(), String> {
        self.ip(&["link", "set", "lo", "up"])?;
        self.ip(&["tuntap", "add", "dev", KV_TAP, "mode", "tap", "vnet_hdr"])?;
        self.ip(&["addr", "add", KV_HOST_CIDR, "dev", KV_TAP])?;
        self.ip(&["link", "set", KV_TAP, "up"])
    }

    /// As [`Netns::add_kv_tap`], with `IFF_MULTI_QUEUE` (for a multiqueue backend that
    /// attaches one queue per pair).
    pub fn add_kv_tap_multi_queue(&self) -> Result<(), String> {
        self.ip(&["link", "set", "lo", "up"])?;
        self.ip(&[
            "tuntap",
            "add",
            "dev",
            KV_TAP,
            "mode",
            "tap",
            "vnet_hdr",
            "multi_queue",
        ])?;
        self.ip(&["addr", "add", KV_HOST_CIDR, "dev", KV_TAP])?;
        self.ip(&["link", "set", KV_TAP, "up"])
    }

    /// Creates [`BASELINE_TAP`] with [`BASELINE_TAP_MAC`] and [`BASELINE_HOST`]'s address /24,
    /// up, with the sender's neighbour entry (nothing answers ARP on it).
    pub fn add_baseline_tap(&self) -> Result<(), String> {
        let mac = BASELINE_TAP_MAC.map(|b| format!("{b:02x}")).join(":");
        let sender_mac = BASELINE_SENDER_MAC.map(|b| format!("{b:02x}")).join(":");
        let host = format!("{}/24", BASELINE_HOST.ip());
        let sender = BASELINE_SENDER.ip().to_string();
        self.ip(&[
            "tuntap",
            "add",
            "dev",
            BASELINE_TAP,
            "mode",
            "tap",
            "vnet_hdr",
        ])?;
        self.ip(&["link", "set", BASELINE_TAP, "address", &mac])?;
        self.ip(&["addr", "add", &host, "dev", BASELINE_TAP])?;
        self.ip(&["link", "set", BASELINE_TAP, "up"])?;
        self.ip(&[
            "neigh",
            "replace",
            &sender,
            "lladdr",
            &sender_mac,
            "dev",
            BASELINE_TAP,
        ])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The calling thread is in a namespace until this is dropped (see [`Netns::enter`]).
pub struct Entered {
    previous: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        set_network_namespace(&self.previous);
    }
}

/// `ip arguments...`; the error names the command and says why it failed.
fn run_ip(arguments: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(arguments)
        .output()
        .map_err(|e| format!("ip {arguments:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {arguments:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn set_network_namespace(ns: &File) {
    // SAFETY: setns on an open namespace file; it changes the calling thread only.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Opens tap `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) in the calling thread's namespace as a
/// descriptor children inherit (no close-on-exec), as an orchestrator hands one over.
pub fn inheritable_tap(name: &str) -> OwnedFd {
    let path = CString::new("/dev/net/tun").unwrap();
    // SAFETY: open(2) of a NUL-terminated path; the result is checked and owned.
    let fd: RawFd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR) };
    assert!(fd >= 0, "/dev/net/tun: {}", std::io::Error::last_os_error());
    // SAFETY: just opened, owned here.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a 40-byte struct ifreq.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETIFF as _, req.as_mut_ptr()) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    owned
}
