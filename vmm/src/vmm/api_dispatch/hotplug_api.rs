//! `vm.add-disk`, `vm.add-net` and `vm.remove-device`, answered as upstream: on a booted VM
//! (running or paused) the device is hotplugged (200 with its `PciDeviceInfo`) or the guest is
//! asked to eject it (204); on a VM created but not booted only the config changes (204); a
//! config the validation refuses is 400, an id in use 409, no VM or an unknown id 404, a device
//! that cannot be set up 500. The config (and an NV VM's stored config) lists the hotplugged
//! devices; an ejected device leaves it when the guest has ejected it, whether it was hotplugged
//! or given at boot. `vm.add-net` takes its taps as descriptors sent with the request
//! (SCM_RIGHTS), as upstream's `ch-remote add-net fd=` sends them.
//!
//! One config is the VM's: once a VM is built, its own (`Vm::config`) is changed by the device
//! changes and `Vmm::vm_config` only ever copies it ([`Vmm::adopt_vm_config`]), so the two
//! cannot diverge; without a built VM, `vm_config` is the only one.

use std::os::unix::io::{AsRawFd, IntoRawFd, OwnedFd};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use crate::api::lifecycle::{check_state, Operation, StateRefusal};
use crate::api::{
    ApiError, ApiMessage, ApiRequest, ApiResponse, PciDeviceInfo, VmState as ApiVmState,
};
use crate::config::{DiskConfig, FsConfig, NetConfig, VmConfig};
use crate::device_manager::{HotplugKind, PendingVhostUser, VhostUserBackend};
use crate::vm::remove_devices_from_config;
use crate::vmm::long_operation::{spawn_worker, Job};
use crate::{nv, Error};

use super::{api_error, Answer, Vmm};

/// The device of an add request.
pub(super) enum AddedDevice {
    Disk(Box<DiskConfig>),
    /// With the descriptors sent along, its taps.
    Net(Box<NetConfig>, Vec<OwnedFd>),
    Fs(Box<FsConfig>),
}

impl AddedDevice {
    fn operation(&self) -> Operation {
        match self {
            AddedDevice::Disk(_) => Operation::AddDisk,
            AddedDevice::Net(..) => Operation::AddNet,
            AddedDevice::Fs(_) => Operation::AddFs,
        }
    }

    fn id(&self) -> Option<&str> {
        match self {
            AddedDevice::Disk(disk) => disk.id.as_deref(),
            AddedDevice::Net(net, _) => net.id.as_deref(),
            AddedDevice::Fs(fs) => fs.id.as_deref(),
        }
    }

    /// Appends the device to `config` as it is.
    fn add_to(&self, config: &mut VmConfig) {
        match self {
            AddedDevice::Disk(disk) => config
                .disks
                .get_or_insert_with(Vec::new)
                .push((**disk).clone()),
            AddedDevice::Net(net, _) => config
                .net
                .get_or_insert_with(Vec::new)
                .push((**net).clone()),
            AddedDevice::Fs(fs) => config.fs.get_or_insert_with(Vec::new).push((**fs).clone()),
        }
    }
}

/// A vhost-user `vm.add-disk` / `vm.add-net` whose worker connects to the backend.
pub(in crate::vmm) struct VhostUserAddJob {
    /// Shared with the worker until it returns.
    pending: Arc<PendingVhostUser>,
    pub result: Receiver<Result<VhostUserBackend, Error>>,
}

/// The disk and net ids `config` names.
fn config_ids(config: &VmConfig) -> impl Iterator<Item = &str> {
    let disks = config
        .disks
        .iter()
        .flatten()
        .filter_map(|d| d.id.as_deref());
    let nets = config.net.iter().flatten().filter_map(|n| n.id.as_deref());
    let fs = config.fs.iter().flatten().filter_map(|f| f.id.as_deref());
    disks.chain(nets).chain(fs)
}

impl Vmm {
    pub(super) fn api_add_device(&mut self, mut device: AddedDevice) -> Answer {
        let operation = device.operation();
        let changed = match self.admit_device(&mut device) {
            Ok(changed) => changed,
            Err(error) => return Answer::error(error),
        };
        let booted = matches!(
            self.api_state(),
            Some(ApiVmState::Running | ApiVmState::Paused)
        );
        let Some(vm) = self.vm.as_mut().filter(|_| booted) else {
            if booted {
                // A worker holds the VM (a snapshot in progress).
                return Answer::error(ApiError::refused(operation, StateRefusal::NotRunning));
            }
            self.vm_config = Some(changed);
            // The config names the descriptors now: they stay open for the boot.
            if let AddedDevice::Net(_, files) = device {
                files.into_iter().for_each(|file| {
                    let _ = file.into_raw_fd();
                });
            }
            return Answer::done();
        };
        let added = match device {
            AddedDevice::Disk(disk) => vm.add_disk(&disk).map(|(disk, bdf)| {
                let id = disk.id.clone().unwrap_or_default();
                (AddedDevice::Disk(Box::new(disk)), id, bdf)
            }),
            AddedDevice::Net(net, files) => {
                // The hotplug takes the descriptors over (closes them if it fails).
                files.into_iter().for_each(|file| {
                    let _ = file.into_raw_fd();
                });
                vm.add_net(&net).map(|(net, bdf)| {
                    let id = net.id.clone().unwrap_or_default();
                    (AddedDevice::Net(Box::new(net), Vec::new()), id, bdf)
                })
            }
            AddedDevice::Fs(fs) => vm.add_fs(&fs).map(|(fs, bdf)| {
                let id = fs.id.clone().unwrap_or_default();
                (AddedDevice::Fs(Box::new(fs)), id, bdf)
            }),
        };
        if let (Ok((AddedDevice::Disk(_), ..)), Some(vm)) = (&added, self.vm.as_ref()) {
            // NV checkpoints undo the new disk's writes too.
            if let Err(e) = self.checkpoints.cover_new_disks(vm) {
                log::error!("the hot-added disk is not covered by NV checkpoints: {e}");
            }
        }
        match added {
            Ok((_, id, bdf)) => {
                self.adopt_vm_config();
                Answer::body(&PciDeviceInfo {
                    id,
                    bdf: bdf.to_string(),
                })
            }
            Err(e) => Answer::error(api_error(operation, e)),
        }
    }

    /// What an add request must pass before anything changes: the VM's state, a config to add
    /// to, an id not in use, its taps' descriptors, and the config with the device validated
    /// (as upstream, on a copy). Returns that copy.
    fn admit_device(&self, device: &mut AddedDevice) -> Result<VmConfig, ApiError> {
        let operation = device.operation();
        check_state(operation, self.api_state())?;
        let Some(config) = self.vm_config.as_ref() else {
            return Err(ApiError::refused(operation, StateRefusal::NotCreated));
        };
        if let Some(id) = device.id() {
            if config_ids(config).any(|used| used == id) {
                return Err(api_error(
                    operation,
                    Error::DuplicateDeviceId(id.to_owned()),
                ));
            }
        }
        if let AddedDevice::Net(net, files) = device {
            if files.is_empty() && net.fds.is_some() {
                // Numbers in the body name descriptors of the client's process.
                return Err(ApiError::failed(
                    400,
                    operation,
                    &Error::Device(
                        "fds: no descriptor came with the request; send the taps with it \
                         (SCM_RIGHTS), as ch-remote add-net fd= does, or name the tap with tap="
                            .to_owned(),
                    ),
                ));
            }
            if !files.is_empty() {
                net.fds = Some(files.iter().map(AsRawFd::as_raw_fd).collect());
            }
        }
        let mut changed = config.clone();
        device.add_to(&mut changed);
        changed
            .validate()
            .map_err(|error| ApiError::failed(400, operation, &error))?;
        Ok(changed)
    }

    /// `vm.add-disk` / `vm.add-net` of a vhost-user device, or `vm.add-fs`, on a booted VM: its backend is
    /// connected by a worker thread (the wait for it lasts up to 10 s, and the control loop must
    /// stay free for a power-fail save meanwhile), and the device is plugged on the control loop
    /// once it is connected ([`Self::finish_vhost_user_add`]). Gives back any other request.
    pub(in crate::vmm) fn start_vhost_user_add(
        &mut self,
        message: ApiMessage,
    ) -> Option<ApiMessage> {
        let vhost_user = match &message.request {
            ApiRequest::VmAddDisk(disk) => disk.vhost_user,
            ApiRequest::VmAddNet(net, _) => net.vhost_user,
            // virtiofsd is always a vhost-user backend.
            ApiRequest::VmAddFs(_) => true,
            _ => false,
        };
        let booted = matches!(
            self.api_state(),
            Some(ApiVmState::Running | ApiVmState::Paused)
        );
        if !vhost_user || !booted || self.vm.is_none() {
            return Some(message);
        }
        let ApiMessage { request, reply } = message;
        let (mut device, kind) = match request {
            ApiRequest::VmAddDisk(disk) => {
                let kind = HotplugKind::Disk((*disk).clone());
                (AddedDevice::Disk(disk), kind)
            }
            ApiRequest::VmAddNet(net, files) => {
                let kind = HotplugKind::Net((*net).clone());
                (AddedDevice::Net(net, files), kind)
            }
            ApiRequest::VmAddFs(fs) => {
                let kind = HotplugKind::Fs((*fs).clone());
                (AddedDevice::Fs(fs), kind)
            }
            request => return Some(ApiMessage { request, reply }),
        };
        let operation = device.operation();
        if let Err(error) = self.admit_device(&mut device) {
            let _ = reply.send(Err(error));
            return None;
        }
        let Some(vm) = self.vm.as_ref() else {
            let _ = reply.send(Err(ApiError::refused(operation, StateRefusal::NotRunning)));
            return None;
        };
        let pending = match vm.prepare_vhost_user(&kind) {
            Ok(pending) => Arc::new(pending),
            Err(e) => {
                let _ = reply.send(Err(api_error(operation, e)));
                return None;
            }
        };
        let connecting = Arc::clone(&pending);
        let spawned = spawn_worker("vhost-user-connect", &self.long_operation_done, move || {
            connecting.connect()
        });
        match spawned {
            Ok(result) => {
                log::info!(
                    "{}: connecting to the vhost-user backend at {} on a worker thread",
                    operation.path(),
                    pending.socket()
                );
                self.begin_long_operation(
                    operation,
                    reply,
                    Job::VhostUserAdd(VhostUserAddJob { pending, result }),
                );
            }
            Err(e) => {
                let _ = reply.send(Err(api_error(operation, e)));
            }
        }
        None
    }

    /// The worker connected (or gave up): the device is plugged on its session and the config
    /// adopted, or the failure answered.
    pub(in crate::vmm) fn finish_vhost_user_add(
        &mut self,
        operation: Operation,
        job: VhostUserAddJob,
        connected: Result<VhostUserBackend, Error>,
    ) -> ApiResponse {
        let backend = connected.map_err(|e| api_error(operation, e))?;
        // The worker has dropped its share by now (it reports after returning).
        let pending = Arc::try_unwrap(job.pending).map_err(|_| {
            ApiError::internal("the vhost-user connection worker still holds the device")
        })?;
        let Some(vm) = self.vm.as_mut() else {
            return Err(ApiError::refused(operation, StateRefusal::NotRunning));
        };
        let (kind, bdf) = vm
            .add_vhost_user(pending, backend)
            .map_err(|e| api_error(operation, e))?;
        let id = match &kind {
            HotplugKind::Disk(disk) => disk.id.clone(),
            HotplugKind::Net(net) => net.id.clone(),
            HotplugKind::Fs(fs) => fs.id.clone(),
        };
        self.adopt_vm_config();
        serde_json::to_value(PciDeviceInfo {
            id: id.unwrap_or_default(),
            bdf: bdf.to_string(),
        })
        .map(Some)
        .map_err(|e| ApiError::internal(format!("encoding the answer: {e}")))
    }

    pub(super) fn api_remove_device(&mut self, id: &str) -> Answer {
        let operation = Operation::RemoveDevice;
        if let Err(error) = check_state(operation, self.api_state()) {
            return Answer::error(error);
        }
        if let Some(vm) = self.vm.as_ref() {
            if self.checkpoints.is_on() && vm.devices.has_live_disk(id) {
                let error = Error::DiskRemovalWhileCheckpointed(id.to_owned());
                return Answer::error(api_error(operation, error));
            }
            return match vm.remove_device(id) {
                Ok(()) => Answer::done(),
                Err(e) => Answer::error(api_error(operation, e)),
            };
        }
        let Some(config) = self.vm_config.as_mut() else {
            return Answer::error(ApiError::refused(operation, StateRefusal::NotCreated));
        };
        if !config_ids(config).any(|known| known == id) {
            return Answer::error(api_error(operation, Error::UnknownDeviceId(id.to_owned())));
        }
        remove_devices_from_config(config, &[id.to_owned()]);
        Answer::done()
    }

    /// After a device activation wake-up: the devices the guest ejected leave the config (and
    /// an NV VM's stored config).
    pub(in crate::vmm) fn forget_ejected_devices(&mut self) {
        let Some(vm) = self.vm.as_mut() else {
            return;
        };
        if vm.take_ejected_devices().is_empty() {
            return;
        }
        self.adopt_vm_config();
    }

    /// After the VM changed its devices: its config becomes the one `vm.info`, a reboot and
    /// `vm_config`'s other readers see, and, for an NV VM, the one stored in its region, so a
    /// recovery builds the devices it has now.
    fn adopt_vm_config(&mut self) {
        let Some(vm) = self.vm.as_ref() else {
            return;
        };
        self.vm_config = Some(vm.config().clone());
        let Some(nv_vm) = self.nv.as_ref() else {
            return;
        };
        if let Err(e) = nv::store_config(nv_vm, vm.config()) {
            log::error!("storing the VM config after a device change: {e}");
        }
    }
}
