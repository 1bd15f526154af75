//! `vm.add-disk`, `vm.add-net` and `vm.remove-device`, answered as upstream: on a booted VM
//! (running or paused) the device is hotplugged (200 with its `PciDeviceInfo`) or the guest is
//! asked to eject it (204); on a VM created but not booted only the config changes (204); a
//! config the validation refuses is 400, an id in use 409, no VM or an unknown id 404, a device
//! that cannot be set up 500. The config (and an NV VM's stored config) lists the hotplugged
//! devices; an ejected device leaves it when the guest has ejected it.

use crate::api::lifecycle::{check_state, Operation, StateRefusal};
use crate::api::{ApiError, PciDeviceInfo, VmState as ApiVmState};
use crate::config::{DiskConfig, FsConfig, NetConfig, VmConfig};
use crate::vm::remove_devices_from_config;
use crate::{nv, Error};

use super::{api_error, Answer, Vmm};

/// The device of an add request.
pub(super) enum AddedDevice {
    Disk(Box<DiskConfig>),
    Net(Box<NetConfig>),
    Fs(Box<FsConfig>),
}

impl AddedDevice {
    fn operation(&self) -> Operation {
        match self {
            AddedDevice::Disk(_) => Operation::AddDisk,
            AddedDevice::Net(_) => Operation::AddNet,
            AddedDevice::Fs(_) => Operation::AddFs,
        }
    }

    fn id(&self) -> Option<&str> {
        match self {
            AddedDevice::Disk(disk) => disk.id.as_deref(),
            AddedDevice::Net(net) => net.id.as_deref(),
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
            AddedDevice::Net(net) => config
                .net
                .get_or_insert_with(Vec::new)
                .push((**net).clone()),
            AddedDevice::Fs(fs) => config.fs.get_or_insert_with(Vec::new).push((**fs).clone()),
        }
    }
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
    pub(super) fn api_add_device(&mut self, device: AddedDevice) -> Answer {
        let operation = device.operation();
        if let Err(error) = check_state(operation, self.api_state()) {
            return Answer::error(error);
        }
        let Some(config) = self.vm_config.as_ref() else {
            return Answer::error(ApiError::refused(operation, StateRefusal::NotCreated));
        };
        // As upstream: the change is validated on a copy of the config first.
        if let Some(id) = device.id() {
            if config_ids(config).any(|used| used == id) {
                return Answer::error(api_error(
                    operation,
                    Error::DuplicateDeviceId(id.to_owned()),
                ));
            }
        }
        if let AddedDevice::Net(net) = &device {
            if net.fds.is_some() {
                // The numbers name descriptors of the client's process; this server takes no
                // descriptors with a request (SCM_RIGHTS).
                return Answer::error(ApiError::failed(
                    400,
                    operation,
                    &Error::Device(
                        "fds: tap descriptors cannot be handed over through this VMM's API; \
                         name the tap with tap="
                            .to_owned(),
                    ),
                ));
            }
        }
        let mut changed = config.clone();
        device.add_to(&mut changed);
        if let Err(error) = changed.validate() {
            return Answer::error(ApiError::failed(400, operation, &error));
        }
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
            return Answer::done();
        };
        let added = match &device {
            AddedDevice::Disk(disk) => vm.add_disk(disk).map(|(disk, bdf)| {
                let id = disk.id.clone().unwrap_or_default();
                (AddedDevice::Disk(Box::new(disk)), id, bdf)
            }),
            AddedDevice::Net(net) => vm.add_net(net).map(|(net, bdf)| {
                let id = net.id.clone().unwrap_or_default();
                (AddedDevice::Net(Box::new(net)), id, bdf)
            }),
            AddedDevice::Fs(fs) => vm.add_fs(fs).map(|(fs, bdf)| {
                let id = fs.id.clone().unwrap_or_default();
                (AddedDevice::Fs(Box::new(fs)), id, bdf)
            }),
        };
        match added {
            Ok((device, id, bdf)) => {
                if let Some(config) = self.vm_config.as_mut() {
                    device.add_to(config);
                }
                self.store_nv_config();
                Answer::body(&PciDeviceInfo {
                    id,
                    bdf: bdf.to_string(),
                })
            }
            Err(e) => Answer::error(api_error(operation, e)),
        }
    }

    pub(super) fn api_remove_device(&mut self, id: &str) -> Answer {
        let operation = Operation::RemoveDevice;
        if let Err(error) = check_state(operation, self.api_state()) {
            return Answer::error(error);
        }
        if let Some(vm) = self.vm.as_ref() {
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
        let ejected = vm.take_ejected_devices();
        if ejected.is_empty() {
            return;
        }
        if let Some(config) = self.vm_config.as_mut() {
            remove_devices_from_config(config, &ejected);
        }
        self.store_nv_config();
    }

    /// Writes the VM's config into its NV region, so a recovery builds the devices it has now.
    fn store_nv_config(&self) {
        let (Some(nv_vm), Some(vm)) = (self.nv.as_ref(), self.vm.as_ref()) else {
            return;
        };
        if let Err(e) = nv::store_config(nv_vm, vm.config()) {
            log::error!("storing the VM config after a device change: {e}");
        }
    }
}
