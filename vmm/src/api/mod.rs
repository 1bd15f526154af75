//! The REST API: the contract between the HTTP server thread and the VMM control loop.
//!
//! The server (its own thread, see [`server`]) turns each HTTP request into an [`ApiRequest`],
//! sends it to the control loop as an [`ApiMessage`] over a channel, writes the `wake` eventfd so
//! the control loop's epoll notices, and blocks until the control loop answers on `reply`. The
//! control loop answers every message exactly once with an [`ApiResponse`]:
//! `Ok(Some(body))` becomes `200` with the JSON body, `Ok(None)` becomes `204`, and an
//! [`ApiError`] becomes its status with a JSON array of strings as the body, as upstream answers.
//!
//! Paths, methods and bodies follow `docs/openapi.yaml` (the upstream cloud-hypervisor v53 spec
//! extended with the NV endpoints); `docs/api.md` explains the differences from upstream.

mod http;
pub mod lifecycle;
mod nv_bodies;
mod routes;
mod server;
mod socket;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{ApiSocketConfig, RestoreConfig, VmConfig};

pub use lifecycle::{check_state, Operation, StateRefusal};
pub use routes::{HttpMethod, Route, API_PREFIX, ROUTES};
pub use server::ServerLimits;

/// One operation asked of the control loop.
#[derive(Debug)]
pub enum ApiRequest {
    /// `GET /vmm.ping`: answer with a [`VmmPingResponse`].
    VmmPing,
    /// `PUT /vmm.shutdown`: answer `Ok(None)`, then stop the VMM process.
    VmmShutdown,
    /// `PUT /vm.create`.
    VmCreate(Box<VmConfig>),
    /// `PUT /vm.boot`.
    VmBoot,
    /// `PUT /vm.delete`.
    VmDelete,
    /// `GET /vm.info`: answer with a [`VmInfoResponse`].
    VmInfo,
    /// `GET /vm.counters`: answer with a [`VmCounters`].
    VmCounters,
    /// `PUT /vm.pause`.
    VmPause,
    /// `PUT /vm.resume`.
    VmResume,
    /// `PUT /vm.shutdown`.
    VmShutdown,
    /// `PUT /vm.reboot`.
    VmReboot,
    /// `PUT /vm.power-button`: raise the ACPI power button event (the GED's).
    VmPowerButton,
    /// `PUT /vm.snapshot`: copy-based snapshot in upstream's directory layout.
    VmSnapshot(VmSnapshotConfig),
    /// `PUT /vm.restore`: copy-based restore from a snapshot directory.
    VmRestore(RestoreConfig),
    /// `GET /vm.nv-status`: answer with an [`NvStatus`].
    NvStatus,
    /// `PUT /vm.power-fail`: run the power-fail save now. Answer `Ok(None)` once the state is
    /// committed, *before* the VMM exits, so the client learns the save completed.
    NvPowerFail,
    /// `PUT /vm.nv-suspend`: planned suspend (same save path, clean exit). Answer as for
    /// [`ApiRequest::NvPowerFail`].
    NvSuspend,
    /// `PUT /vm.nv-recover`: recover a VM from a region into this (empty) VMM.
    NvRecover(NvRecoverConfig),
    /// `GET /vmm.nv-regions?region=PATH`: answer with an [`NvRegionListing`].
    NvRegions(NvRegionsQuery),
    /// `PUT /vm.nv-swap-out`: save the VM, write it to a swap file, free its extent; answer
    /// `Ok(None)` once all of that is durable, then the VMM exits 0.
    NvSwapOut(NvSwapOutConfig),
    /// `PUT /vm.nv-swap-in`: bring a swapped-out VM back from its swap file into this (empty)
    /// VMM and resume it.
    NvSwapIn(NvSwapInConfig),
    /// `PUT /vm.nv-checkpoint`: take an epoch checkpoint every `interval_ms` (0: off).
    NvCheckpoint(NvCheckpointConfig),
    /// `PUT /vm.add-disk`: hotplug a disk (upstream's `DiskConfig`).
    VmAddDisk(Box<crate::config::DiskConfig>),
    /// `PUT /vm.add-net`: hotplug a virtio-net device (upstream's `NetConfig`), with the tap
    /// descriptors the client sent along (SCM_RIGHTS), which become its `fds`.
    VmAddNet(
        Box<crate::config::NetConfig>,
        Vec<std::os::unix::io::OwnedFd>,
    ),
    /// `PUT /vm.add-fs`: hotplug a virtio-fs device (upstream's `FsConfig`).
    VmAddFs(Box<crate::config::FsConfig>),
    /// `PUT /vm.remove-device`: ask the guest to eject a device (upstream's `VmRemoveDevice`).
    VmRemoveDevice(VmRemoveDevice),
    /// An upstream operation this VMM does not carry out: answer as upstream would for the VM's
    /// state ([`check_state`]), then with [`lifecycle::not_implemented`].
    Unimplemented(Operation),
}

impl ApiRequest {
    /// The operation asked for: its [`Operation::path`] names the request in messages.
    pub fn operation(&self) -> Operation {
        match self {
            ApiRequest::VmmPing => Operation::VmmPing,
            ApiRequest::VmmShutdown => Operation::VmmShutdown,
            ApiRequest::VmCreate(_) => Operation::Create,
            ApiRequest::VmBoot => Operation::Boot,
            ApiRequest::VmDelete => Operation::Delete,
            ApiRequest::VmInfo => Operation::Info,
            ApiRequest::VmCounters => Operation::Counters,
            ApiRequest::VmPause => Operation::Pause,
            ApiRequest::VmResume => Operation::Resume,
            ApiRequest::VmShutdown => Operation::Shutdown,
            ApiRequest::VmReboot => Operation::Reboot,
            ApiRequest::VmPowerButton => Operation::PowerButton,
            ApiRequest::VmSnapshot(_) => Operation::Snapshot,
            ApiRequest::VmRestore(_) => Operation::Restore,
            ApiRequest::NvStatus => Operation::NvStatus,
            ApiRequest::NvPowerFail => Operation::NvPowerFail,
            ApiRequest::NvSuspend => Operation::NvSuspend,
            ApiRequest::NvRecover(_) => Operation::NvRecover,
            ApiRequest::NvRegions(_) => Operation::NvRegions,
            ApiRequest::NvSwapOut(_) => Operation::NvSwapOut,
            ApiRequest::NvSwapIn(_) => Operation::NvSwapIn,
            ApiRequest::NvCheckpoint(_) => Operation::NvCheckpoint,
            ApiRequest::VmAddDisk(_) => Operation::AddDisk,
            ApiRequest::VmAddNet(..) => Operation::AddNet,
            ApiRequest::VmAddFs(_) => Operation::AddFs,
            ApiRequest::VmRemoveDevice(_) => Operation::RemoveDevice,
            ApiRequest::Unimplemented(operation) => *operation,
        }
    }
}

/// The first element of the body of an error the control loop answered, as upstream names it.
pub const API_LAYER: &str = "Error from API";

/// An error answer: an HTTP status and the JSON array of strings the client sees as the body,
/// `[layer, message, causes...]` as upstream cloud-hypervisor writes it: the layer that failed
/// (`"Error from API"` for the control loop), what failed, then why, outermost cause first.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} (HTTP {status})", self.body().join(": "))]
pub struct ApiError {
    pub status: u16,
    pub layer: &'static str,
    /// What failed (upstream: "The VM could not boot"). Empty for a bare layer (`["Not Found"]`).
    pub message: String,
    /// Why it failed, outermost first.
    pub causes: Vec<String>,
}

impl ApiError {
    /// A control-loop error with one message and no cause.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            layer: API_LAYER,
            message: message.into(),
            causes: Vec::new(),
        }
    }

    /// `operation` failed because of `error`: the body lists `error` and its sources.
    pub fn failed(status: u16, operation: Operation, error: &dyn std::error::Error) -> Self {
        ApiError {
            status,
            layer: API_LAYER,
            message: operation.failure().to_owned(),
            causes: cause_chain(error),
        }
    }

    /// `operation` is refused by the VM's state (see [`lifecycle::check_state`]).
    pub fn refused(operation: Operation, refusal: StateRefusal) -> Self {
        Self::failed(refusal.status(), operation, &refusal)
    }

    /// An error of the HTTP layer: `["Not Found"]`, `["Bad Request", "<detail>"]`...
    pub fn http(status: u16, layer: &'static str, detail: Option<String>) -> Self {
        ApiError {
            status,
            layer,
            message: detail.unwrap_or_default(),
            causes: Vec::new(),
        }
    }

    /// A body that is not the JSON the operation takes: `["Failed to deserialize JSON", "<why>"]`.
    pub fn deserialize(error: &serde_json::Error) -> Self {
        Self::http(400, "Failed to deserialize JSON", Some(error.to_string()))
    }

    /// A request the HTTP layer refuses before it reaches the control loop.
    pub fn invalid_request(detail: impl Into<String>) -> Self {
        Self::http(400, "Bad Request", Some(detail.into()))
    }

    /// 400 from the control loop: the request is not an acceptable configuration.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// 404: the VM (or NV region, NV VM) the operation needs does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, message)
    }

    /// 409: the request is valid but the current state refuses it (an NV VM that cannot be
    /// resumed, or that another live process owns).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }

    /// 500: the operation was attempted and failed, or the VM's state refuses it.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }

    /// The JSON array of the body.
    pub fn body(&self) -> Vec<String> {
        let mut body = vec![self.layer.to_owned()];
        if !self.message.is_empty() {
            body.push(self.message.clone());
        }
        body.extend(self.causes.iter().cloned());
        body
    }
}

/// `error` and its sources as strings, outermost first. Many of our errors already print their
/// source inside their own message ("disk image /x: No such file"); a source whose text the
/// previous element already holds is not repeated.
pub fn cause_chain(error: &dyn std::error::Error) -> Vec<String> {
    let mut chain: Vec<String> = vec![error.to_string()];
    let mut next = error.source();
    while let Some(source) = next {
        let text = source.to_string();
        if !chain
            .last()
            .is_some_and(|previous| previous.contains(&text))
        {
            chain.push(text);
        }
        next = source.source();
    }
    chain
}

/// What the control loop answers: `Some(body)` -> 200 with JSON, `None` -> 204.
pub type ApiResponse = Result<Option<serde_json::Value>, ApiError>;

/// One request in flight to the control loop. The control loop must send exactly one answer on
/// `reply`; dropping it unanswered makes the client see a 500.
#[derive(Debug)]
pub struct ApiMessage {
    pub request: ApiRequest,
    pub reply: Sender<ApiResponse>,
}

/// Errors setting up the API socket or its thread. Errors of individual requests are
/// [`ApiError`]s and never stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("API socket {path}: another process is already serving on it")]
    SocketInUse { path: String },
    #[error(
        "API socket {path}: the path is {length} bytes long; a Unix socket path holds at most 107"
    )]
    PathTooLong { path: String, length: usize },
    #[error("API socket {path}: the path exists and is not a socket; refusing to replace it")]
    NotASocket { path: String },
    #[error("API socket {path}: {action}: {source}")]
    SocketPath {
        path: String,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("API socket fd={fd}: {reason}")]
    InheritedFd { fd: i32, reason: String },
    #[error("cannot start the API server thread: {0}")]
    Spawn(std::io::Error),
    #[error("API server thread: {0}")]
    Seccomp(#[source] crate::seccomp_filters::SeccompError),
}

/// Starts the HTTP server on its own thread, serving `socket` until the process exits.
///
/// `path=`: the socket is created owner-only (0600); a stale socket file (nobody listening) is
/// replaced, a live one is refused with [`ApiServerError::SocketInUse`]. `fd=N`: an inherited,
/// already listening Unix stream socket, owned by the server from then on.
pub fn start_http_server(
    socket: ApiSocketConfig,
    to_vmm: Sender<ApiMessage>,
    wake: EventFd,
) -> Result<JoinHandle<()>, ApiServerError> {
    start_http_server_with_limits(socket, to_vmm, wake, ServerLimits::default())
}

/// [`start_http_server`] with explicit size and time limits (tests use short timeouts).
pub fn start_http_server_with_limits(
    socket: ApiSocketConfig,
    to_vmm: Sender<ApiMessage>,
    wake: EventFd,
    limits: ServerLimits,
) -> Result<JoinHandle<()>, ApiServerError> {
    let listener = socket::listen(&socket)?;
    // The config check of a `vm.create` asks KVM for its vCPU limit, once per process. It runs
    // on the server's threads, whose filter forbids the KVM ioctls: ask now, before they start,
    // so that no embedder has to remember to.
    let _ = crate::config::host_vcpu_limit();
    server::spawn(listener, to_vmm, wake, limits)
}

/// What the server makes of one request read from raw connection bytes (see
/// [`route_connection_bytes`]).
#[derive(Debug)]
pub enum RoutedRequest {
    /// The framing refused the bytes: the status the server answers (`None`: it just closes).
    Refused(Option<u16>),
    /// A request was read: its method, path and body length, and what routing made of it (the
    /// control loop's request, or the error status and message the server answers).
    Request {
        method: String,
        path: String,
        body_len: usize,
        outcome: Result<ApiRequest, ApiError>,
    },
}

/// Reads every request from `bytes` as a connection thread reads its socket, and routes each as
/// the server does (404 unknown path, 400 wrong method, then the body parsers), without a
/// control loop. For the fuzz targets (`fuzz/`); `bytes` should stay under 64 KiB (they are
/// written to a socket pair first).
pub fn route_connection_bytes(bytes: &[u8]) -> Vec<RoutedRequest> {
    use std::io::Write;
    let Ok((mut client, server)) = std::os::unix::net::UnixStream::pair() else {
        return Vec::new();
    };
    if client
        .write_all(bytes)
        .and_then(|()| client.shutdown(std::net::Shutdown::Write))
        .is_err()
    {
        return Vec::new();
    }
    let limits = ServerLimits::default();
    let framing = http::FramingLimits {
        max_header_bytes: limits.max_header_bytes,
        max_body_bytes: limits.max_body_bytes,
        request_timeout: std::time::Duration::from_millis(200),
        idle_timeout: std::time::Duration::from_millis(200),
    };
    let mut connection = http::Connection::new(server);
    let mut routed = Vec::new();
    loop {
        match connection.read_request(&framing) {
            Ok(None) => return routed,
            Err(error) => {
                routed.push(RoutedRequest::Refused(error.status()));
                return routed;
            }
            Ok(Some(request)) => {
                let outcome = routes::route_request(
                    &request.method,
                    &request.path,
                    &request.body,
                    request.query.as_deref(),
                );
                let keep_alive = request.keep_alive;
                routed.push(RoutedRequest::Request {
                    method: request.method,
                    path: request.path,
                    body_len: request.body.len(),
                    outcome,
                });
                if !keep_alive {
                    return routed;
                }
            }
        }
    }
}

/// The control loop's request for `path` (`/api/v1/...`) with `body` and `query`, as the server
/// builds it, or `None` for an unknown path. For the fuzz targets (`fuzz/`).
pub fn build_api_request(
    path: &str,
    body: &[u8],
    query: Option<&str>,
) -> Option<Result<ApiRequest, ApiError>> {
    routes::find_route(path).map(|route| routes::build_request(route, body, query))
}

/// For the control loop, just before the VMM process exits (after answering `vmm.shutdown`, or
/// after a power-fail or suspend save): answers every request still queued with 503 ("the VMM is
/// shutting down") and waits up to `timeout` until every answer, including the one just sent for
/// the request that ends the VMM, has been written to its client. Returns false on timeout.
pub fn finish_pending_requests(from_api: &Receiver<ApiMessage>, timeout: Duration) -> bool {
    while let Ok(message) = from_api.try_recv() {
        // The client may be gone already; nothing to do about it then.
        let _ = message.reply.send(Err(shutting_down()));
    }
    server::wait_for_answers_written(timeout)
}

/// The answer to a request still queued when the VMM ends.
pub fn shutting_down() -> ApiError {
    ApiError::new(503, "the VMM is shutting down")
}

/// Body of `PUT /vm.remove-device` (upstream's `VmRemoveDevice`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRemoveDevice {
    pub id: String,
}

/// Answer of `vm.add-disk` / `vm.add-net` on a booted VM (upstream's `PciDeviceInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    pub id: String,
    /// `0000:00:03.0`.
    pub bdf: String,
}

/// Body of `PUT /vm.snapshot` (upstream's `VmSnapshotConfig`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshotConfig {
    /// `file:///dir`: the directory receives `config.json`, `state.json` and `memory-ranges`.
    pub destination_url: String,
}

/// Body of `PUT /vm.nv-recover`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvRecoverConfig {
    /// Path of the NV region (file, DAX file or devdax device).
    pub region: String,
    /// Name of the VM inside the region.
    pub vm: String,
}

/// Body of `PUT /vm.nv-swap-out`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvSwapOutConfig {
    /// `file:///absolute/path` of the swap file to create; an existing file is refused.
    pub destination_url: String,
}

/// Body of `PUT /vm.nv-checkpoint`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvCheckpointConfig {
    /// Milliseconds between two epoch checkpoints; 0 turns checkpoints off.
    pub interval_ms: u64,
}

/// Body of `PUT /vm.nv-swap-in`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvSwapInConfig {
    /// `file:///absolute/path` of the swap file.
    pub source_url: String,
    /// The region to swap into; default: the region path recorded in the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The VM's name, checked against the file's; default: the file's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Keep the swap file after the swap-in committed (default: remove it).
    #[serde(default)]
    pub keep: bool,
}

/// Query of `GET /vmm.nv-regions?region=PATH`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvRegionsQuery {
    pub region: String,
}

/// Body of `GET /vmm.ping` (upstream's `VmmPingResponse`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    pub build_version: String,
    pub version: String,
    pub pid: i64,
    pub features: Vec<String>,
}

/// Upstream's `VmState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
    BreakPoint,
}

/// Body of `GET /vm.info` (upstream's `VmInfo`): the whole config with every member filled in,
/// the state, and, once the VM is booted, its RAM and the devices it really has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfoResponse {
    pub config: VmConfig,
    pub state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_actual_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_tree: Option<BTreeMap<String, DeviceNode>>,
}

impl VmInfoResponse {
    /// `device_tree`: device id -> node, from the devices the VM really has. A virtio device on
    /// a virtio-pci function is two nodes, as upstream lists them: the function
    /// `_virtio-pci-<id>` with the BARs and `pci_bdf`, whose one child is the device `<id>`
    /// (no resources, `pci_bdf` null).
    pub fn device_tree(
        devices: &[crate::device_manager::DeviceResources],
    ) -> std::collections::BTreeMap<String, DeviceNode> {
        let mut tree = BTreeMap::new();
        for device in devices {
            let pio = device.pio.and_then(|(base, size)| {
                Some(DeviceResource::PioAddressRange {
                    base: u16::try_from(base).ok()?,
                    size: u16::try_from(size).ok()?,
                })
            });
            let mmio = device
                .mmio
                .map(|(base, size)| DeviceResource::MmioAddressRange { base, size });
            let bars = device
                .pci
                .iter()
                .flat_map(|(_, bars)| bars)
                .map(DeviceResource::pci_bar);
            let resources = pio
                .into_iter()
                .chain(mmio)
                .chain(bars)
                .chain(device.irq.map(DeviceResource::LegacyIrq))
                .collect();
            let mut node = DeviceNode {
                id: device.id.clone(),
                resources,
                children: Vec::new(),
                pci_bdf: device.pci.as_ref().map(|(bdf, _)| bdf.to_string()),
            };
            if device.virtio_pci {
                let function = DeviceNode {
                    id: format!("{VIRTIO_PCI_NODE_PREFIX}-{}", device.id),
                    resources: std::mem::take(&mut node.resources),
                    children: vec![device.id.clone()],
                    pci_bdf: node.pci_bdf.take(),
                };
                tree.insert(function.id.clone(), function);
            }
            tree.insert(device.id.clone(), node);
        }
        tree
    }
}

/// Upstream's id prefix of a virtio-pci function's node in `device_tree`
/// (`_virtio-pci-_disk0` is the function of `_disk0`).
pub const VIRTIO_PCI_NODE_PREFIX: &str = "_virtio-pci";

/// Upstream's `DeviceNode`: one device of `vm.info`'s `device_tree`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    pub id: String,
    pub resources: Vec<DeviceResource>,
    pub children: Vec<String>,
    /// A PCI device's address as upstream prints it (`0000:00:01.0`); `null` for the others.
    pub pci_bdf: Option<String>,
}

/// Upstream's `Resource`, as serde writes that Rust enum: `{"MmioAddressRange":{"base":..,
/// "size":..}}`, `{"LegacyIrq":4}`, and for each BAR of a PCI device `{"PciBar":{"index":0,
/// "base":..,"size":..,"type_":"Mmio64","prefetchable":false}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceResource {
    PioAddressRange {
        base: u16,
        size: u16,
    },
    MmioAddressRange {
        base: u64,
        size: u64,
    },
    LegacyIrq(u32),
    PciBar {
        index: usize,
        base: u64,
        size: u64,
        type_: PciBarType,
        prefetchable: bool,
    },
}

impl DeviceResource {
    /// A BAR where it decodes now (0 before it was assigned), as upstream lists it.
    pub fn pci_bar(bar: &devices::pci::Bar) -> Self {
        let (type_, prefetchable) = match bar.kind {
            devices::pci::BarKind::Io => (PciBarType::Io, false),
            devices::pci::BarKind::Memory32 { prefetchable } => (PciBarType::Mmio32, prefetchable),
            devices::pci::BarKind::Memory64 { prefetchable } => (PciBarType::Mmio64, prefetchable),
        };
        Self::PciBar {
            index: bar.index,
            base: bar.address,
            size: bar.size,
            type_,
            prefetchable,
        }
    }
}

/// Upstream's `PciBarType`: the kind of a `PciBar` resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PciBarType {
    Io,
    Mmio32,
    Mmio64,
}

/// Body of `GET /vm.counters`: device id -> counter name -> value (upstream's `VmCounters`).
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

/// Why a persistent VM last stopped, as recorded in its region's VM table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NvShutdownKind {
    /// Running now (or died without any save: see `Unsafe`).
    Running,
    /// Stopped by a power-fail save that committed.
    PowerFail,
    /// Stopped by a planned suspend that committed.
    Suspend,
    /// Died without a save and was recovered from its last committed checkpoint epoch.
    Checkpoint,
    /// Shut down cleanly by the guest or the operator; cold boot next time.
    Clean,
    /// The guest asked for a reset and the VMM ended instead of rebooting; cold boot next time.
    GuestReset,
    /// The guest triple-faulted (crashed) and the VMM ended; cold boot next time.
    TripleFault,
    /// Died without a completed save: state incomplete, cold boot only.
    Unsafe,
    /// Never run since it was created in the region.
    Never,
    /// Swapped out to a file (`vm.nv-swap-out`): its NV memory is free; swap it in to run it.
    SwappedOut,
}

/// How the region makes stores durable (the nv-extension persistence backend in use).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NvPersistenceMode {
    /// Plain file mapping, `msync(MS_SYNC)`.
    Msync,
    /// DAX file mapped `MAP_SYNC`, cache-line write-back + `sfence`.
    DaxMapSync,
    /// `/dev/daxX.Y` device, cache-line write-back + `sfence`.
    Devdax,
}

/// Duration of one phase of the last save.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvPhaseTiming {
    /// Phase name, e.g. `pause`, `drain-block`, `sync-disks`, `persist-memory`, `save-state`,
    /// `commit`.
    pub phase: String,
    pub duration_us: u64,
}

/// The last power-fail or suspend save of this VM, as the saving process recorded it in the
/// region (so a recovered VM, or a listing, shows it after that process exited).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvLastSave {
    /// Sequence number the save committed.
    pub sequence: u64,
    /// `PowerFail` or `Suspend`.
    pub kind: NvShutdownKind,
    pub total_us: u64,
    /// The deadline the save ran under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_us: Option<u64>,
    pub deadline_overrun: bool,
    pub phases: Vec<NvPhaseTiming>,
}

/// Body of `GET /vm.nv-status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvStatus {
    pub region: String,
    pub persistence_mode: NvPersistenceMode,
    pub vm: String,
    /// Sequence of the newest committed state, if any save ever committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_save_sequence: Option<u64>,
    /// How the VM ended last time (before this run), from the VM table.
    pub shutdown_kind: NvShutdownKind,
    pub deadline_ms: u64,
    /// Timings of the last save this process or a previous one performed, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_save: Option<NvLastSave>,
    /// A swap-out or swap-in in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap: Option<NvSwapProgress>,
    /// Where this run's in-place recovery spent its time (a resumed VM only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<NvRecoveryTimings>,
    /// How the host maps the guest's RAM (huge pages); absent while no VM runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mapping: Option<NvMemoryMapping>,
    /// Continuous checkpoints: the interval and what the last one cost; absent while they are
    /// off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<NvCheckpointStatus>,
}

/// `vm.nv-status`'s `checkpoint`: the interval, the last committed epoch and its cost.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvCheckpointStatus {
    pub interval_ms: u64,
    /// Epochs committed by this process.
    pub epochs: u64,
    /// Sequence of the last committed epoch (absent before the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_epoch_sequence: Option<u64>,
    /// How long the guest was paused for the last checkpoint.
    pub last_pause_us: u64,
    /// Bytes the undo log held when the last epoch ended (old page contents written).
    pub last_undo_bytes: u64,
    /// Over the most recent checkpoints (up to 1024): the median and 99th percentile pause,
    /// and the mean undo-log bytes per epoch.
    pub recent_pause_median_us: u64,
    pub recent_pause_p99_us: u64,
    pub recent_undo_bytes_mean: u64,
    /// Write faults per epoch served by the undo log's fault thread (mean over the same).
    #[serde(default)]
    pub recent_write_faults_mean: u64,
    /// Of `epochs`, those ended before the interval because the undo log (or the network
    /// output hold) was full: an epoch that writes more pages than the log holds.
    #[serde(default)]
    pub early_epochs: u64,
    /// Over the same checkpoints: the median duration of each phase of the pause, in the
    /// walk's order (`pause-vcpus`, `quiesce-devices`, `persist-memory`, `save-state`,
    /// `commit`, `write-protect`, `resume`). Medians of each phase alone: they need not add up
    /// to the pause median.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_phase_median_us: Vec<NvPhaseTiming>,
}

/// The phases of an in-place recovery, in order, up to the guest running again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvRecoveryTimings {
    /// The sum of the phases: from the VMM's exec when `from_exec` (a `recover=on` command
    /// line), else from the recovery request.
    pub total_us: u64,
    pub from_exec: bool,
    pub phases: Vec<NvPhaseTiming>,
}

/// How the host maps the guest's RAM, from `/proc/self/smaps` at the time of the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvMemoryMapping {
    /// Every guest RAM mapping starts at a 2 MiB-aligned host address (huge pages need it).
    pub aligned_2m: bool,
    /// Transparent huge pages were requested (`MADV_HUGEPAGE`) for all of guest RAM.
    pub thp_advised: bool,
    /// Bytes of guest RAM mapped by 2 MiB pages now (0 on a tmpfs without `huge=`).
    pub huge_page_bytes: u64,
}

/// Which way a swap moves the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NvSwapDirection {
    /// From the region to a swap file (`vm.nv-swap-out`).
    Out,
    /// From a swap file into the region (`vm.nv-swap-in`, `--nv swap-in=FILE`).
    In,
}

/// Progress of the swap in progress, in bytes of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvSwapProgress {
    pub direction: NvSwapDirection,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// One VM of a region in `GET /vmm.nv-regions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvRegionVm {
    pub name: String,
    pub uuid: String,
    pub memory_size: u64,
    /// One word for what the VM is doing or what its next start must be:
    /// `nv_extension::VmSummary::status` ("running", "suspended", "power-failed", "unsafe", ...).
    pub state: String,
    /// Pid of the live VMM process that owns the VM, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_pid: Option<u32>,
    pub shutdown_kind: NvShutdownKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_save_sequence: Option<u64>,
    /// True when a committed state can be resumed in place (`recover=on`).
    pub resumable: bool,
    /// How the last save went, when the region holds its report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_save: Option<NvLastSave>,
    /// The swap file of a swapped-out VM, as the region's VM table records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_file: Option<NvSwapFile>,
}

/// Where a swapped-out VM is (`NvRegionVm::swap_file`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvSwapFile {
    pub path: String,
    pub file_size: u64,
}

/// Body of `GET /vmm.nv-regions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvRegionListing {
    pub region: String,
    pub persistence_mode: NvPersistenceMode,
    pub size: u64,
    /// Free bytes inside `size` (a plain-file region also grows at its end when it must).
    pub free_bytes: u64,
    /// The largest single free extent: the largest guest RAM (plus its state area) that fits.
    pub largest_free_extent: u64,
    pub vms: Vec<NvRegionVm>,
}
